//! Host-side tensors: what the caller copies to and from a device.

use crate::error::{Error, Result};
use crate::graph::{DType, Shape};
use half::{bf16, f16};

#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Shape,
    pub dtype: DType,
    /// Little-endian element bytes, row-major.
    pub bytes: Vec<u8>,
}

impl HostTensor {
    pub fn zeros(shape: impl Into<Shape>, dtype: DType) -> Self {
        let shape = shape.into();
        let bytes = vec![0; shape.numel() * dtype.size()];
        HostTensor { shape, dtype, bytes }
    }

    /// Converts f64 values into any dtype (rounding to nearest for halves, truncating for ints).
    pub fn from_f64(shape: impl Into<Shape>, dtype: DType, data: &[f64]) -> Result<Self> {
        let shape = shape.into();
        if shape.numel() != data.len() {
            return Err(Error::msg(format!("{} values do not fill shape {shape}", data.len())));
        }
        let mut bytes = Vec::with_capacity(data.len() * dtype.size());
        for &x in data {
            match dtype {
                DType::F32 => bytes.extend((x as f32).to_le_bytes()),
                DType::F64 => bytes.extend(x.to_le_bytes()),
                DType::BF16 => bytes.extend(bf16::from_f64(x).to_le_bytes()),
                DType::F16 => bytes.extend(f16::from_f64(x).to_le_bytes()),
                DType::I32 => bytes.extend((x as i32).to_le_bytes()),
                DType::I64 => bytes.extend((x as i64).to_le_bytes()),
            }
        }
        Ok(HostTensor { shape, dtype, bytes })
    }

    pub fn from_f32(shape: impl Into<Shape>, data: &[f32]) -> Result<Self> {
        let v: Vec<f64> = data.iter().map(|&x| x as f64).collect();
        Self::from_f64(shape, DType::F32, &v)
    }

    pub fn from_i64(shape: impl Into<Shape>, data: &[i64]) -> Result<Self> {
        let shape = shape.into();
        if shape.numel() != data.len() {
            return Err(Error::msg(format!("{} values do not fill shape {shape}", data.len())));
        }
        Ok(HostTensor { shape, dtype: DType::I64, bytes: data.iter().flat_map(|x| x.to_le_bytes()).collect() })
    }

    pub fn numel(&self) -> usize {
        self.shape.numel()
    }

    /// Every element as f64, whatever the dtype.
    pub fn to_f64(&self) -> Vec<f64> {
        let sz = self.dtype.size();
        self.bytes
            .chunks_exact(sz)
            .map(|c| match self.dtype {
                DType::F32 => f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64,
                DType::F64 => f64::from_le_bytes(c.try_into().expect("8 bytes")),
                DType::BF16 => bf16::from_le_bytes(c.try_into().expect("2 bytes")).to_f64(),
                DType::F16 => f16::from_le_bytes(c.try_into().expect("2 bytes")).to_f64(),
                DType::I32 => i32::from_le_bytes(c.try_into().expect("4 bytes")) as f64,
                DType::I64 => i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64,
            })
            .collect()
    }

    /// The index of the first NaN or infinite element (None for integer tensors), without converting the tensor.
    pub fn first_non_finite(&self) -> Option<usize> {
        let sz = self.dtype.size();
        let finite = |c: &[u8]| match self.dtype {
            DType::F32 => f32::from_le_bytes(c.try_into().expect("4 bytes")).is_finite(),
            DType::F64 => f64::from_le_bytes(c.try_into().expect("8 bytes")).is_finite(),
            DType::BF16 => bf16::from_le_bytes(c.try_into().expect("2 bytes")).is_finite(),
            DType::F16 => f16::from_le_bytes(c.try_into().expect("2 bytes")).is_finite(),
            DType::I32 | DType::I64 => true,
        };
        self.bytes.chunks_exact(sz).position(|c| !finite(c))
    }

    pub fn to_f32(&self) -> Vec<f32> {
        self.to_f64().into_iter().map(|x| x as f32).collect()
    }
}
