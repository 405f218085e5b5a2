//! A tensor as read from a checkpoint: shape, dtype and little-endian row-major bytes, borrowed where possible.

use crate::engine::HostTensor;
use crate::error::{Error, Result};
use crate::graph::{DType, Shape};
use half::{bf16, f16};
use std::borrow::Cow;

/// One tensor of a checkpoint. `bytes` borrows the mapped file unless the tensor had to be made contiguous (a
/// strided PyTorch view) or its archive member had to be decompressed.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorView<'a> {
    pub shape: Vec<usize>,
    pub dtype: DType,
    /// Little-endian element bytes, row-major, contiguous: exactly `numel * dtype.size()` of them.
    pub bytes: Cow<'a, [u8]>,
}

impl<'a> TensorView<'a> {
    /// Checks that `bytes` holds exactly the elements `shape` and `dtype` call for.
    pub fn new(shape: Vec<usize>, dtype: DType, bytes: Cow<'a, [u8]>) -> Result<Self> {
        let need = byte_len(&shape, dtype)
            .ok_or_else(|| Error::msg(format!("shape {shape:?} of {dtype} overflows the address space")))?;
        if bytes.len() != need {
            return Err(Error::msg(format!(
                "shape {shape:?} of {dtype} needs {need} bytes, {} were given",
                bytes.len()
            )));
        }
        Ok(TensorView { shape, dtype, bytes })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the bytes are a slice of the mapped file (no copy was made).
    pub fn is_borrowed(&self) -> bool {
        matches!(self.bytes, Cow::Borrowed(_))
    }

    /// Every element converted to f32 (f64 and i64 round to nearest, as PyTorch's `.float()` does).
    pub fn to_f32(&self) -> Vec<f32> {
        let b = &self.bytes;
        match self.dtype {
            DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            _ => self.to_f64().into_iter().map(|x| x as f32).collect(),
        }
    }

    /// Every element converted to f64 (exact for every dtype except i64 beyond 2^53).
    pub fn to_f64(&self) -> Vec<f64> {
        let b = &self.bytes;
        let arr8 = |c: &[u8]| [c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]];
        match self.dtype {
            DType::F64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(arr8(c))).collect(),
            DType::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(arr8(c)) as f64).collect(),
            DType::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect(),
            _ => self.to_f32().into_iter().map(f64::from).collect(),
        }
    }

    /// Every element of an integer tensor as i64; `None` for float dtypes.
    pub fn to_i64(&self) -> Option<Vec<i64>> {
        let b = &self.bytes;
        match self.dtype {
            DType::I64 => Some(
                b.chunks_exact(8)
                    .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
            ),
            DType::I32 => {
                Some(b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect())
            }
            _ => None,
        }
    }

    /// An owned host tensor (copies the bytes).
    pub fn to_host(&self) -> HostTensor {
        HostTensor { shape: Shape(self.shape.clone()), dtype: self.dtype, bytes: self.bytes.to_vec() }
    }

    /// Detaches the view from the checkpoint's lifetime (copies unless already owned).
    pub fn into_owned(self) -> TensorView<'static> {
        TensorView { shape: self.shape, dtype: self.dtype, bytes: Cow::Owned(self.bytes.into_owned()) }
    }
}

impl<'a> From<&'a HostTensor> for TensorView<'a> {
    fn from(t: &'a HostTensor) -> Self {
        TensorView { shape: t.shape.0.clone(), dtype: t.dtype, bytes: Cow::Borrowed(&t.bytes) }
    }
}

/// `numel * dtype.size()`, or `None` on overflow (a corrupt header can claim any shape).
pub(crate) fn byte_len(shape: &[usize], dtype: DType) -> Option<usize> {
    shape.iter().try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_checks_the_byte_count() {
        assert!(TensorView::new(vec![2, 3], DType::F16, Cow::Owned(vec![0; 12])).is_ok());
        let err = TensorView::new(vec![2, 3], DType::F32, Cow::Owned(vec![0; 12])).unwrap_err().to_string();
        assert!(err.contains("needs 24 bytes, 12 were given"), "{err}");
        assert!(TensorView::new(vec![usize::MAX, 2], DType::F32, Cow::Owned(vec![])).is_err());
    }

    #[test]
    fn conversions_cover_every_dtype() {
        let h = HostTensor::from_f64(vec![3], DType::BF16, &[1.5, -2.0, 0.125]).unwrap();
        assert_eq!(TensorView::from(&h).to_f32(), vec![1.5, -2.0, 0.125]);
        let h = HostTensor::from_f64(vec![2], DType::I32, &[-7.0, 9.0]).unwrap();
        assert_eq!(TensorView::from(&h).to_i64(), Some(vec![-7, 9]));
        assert_eq!(TensorView::from(&h).to_f32(), vec![-7.0, 9.0]);
        let h = HostTensor::from_f64(vec![1], DType::F64, &[0.1]).unwrap();
        assert_eq!(TensorView::from(&h).to_f64(), vec![0.1]);
        assert_eq!(TensorView::from(&h).to_i64(), None);
    }
}
