//! The element types the CPU backend computes in: f32 for real runs, f64 for gradient checks.
//!
//! One trait so every CPU kernel is written once and instantiated twice. Only what kernels need is
//! here; anything else belongs next to the kernel that uses it.

use crate::graph::DType;
use std::fmt::{Debug, Display};
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

pub trait Float:
    Copy
    + Send
    + Sync
    + Default
    + Debug
    + Display
    + PartialOrd
    + Sum
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + 'static
{
    /// The graph dtype this type stores.
    const DTYPE: DType;
    const ZERO: Self;
    const ONE: Self;
    /// Machine epsilon: the gap between 1 and the next representable value.
    const EPSILON: Self;

    fn zero() -> Self {
        Self::ZERO
    }
    fn one() -> Self {
        Self::ONE
    }
    /// Rounds to nearest for f32.
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn from_usize(x: usize) -> Self {
        Self::from_f64(x as f64)
    }
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    /// The error function (GELU's exact form).
    fn erf(self) -> Self;
    fn abs(self) -> Self;
    fn powf(self, exponent: Self) -> Self;
    fn recip(self) -> Self;
    /// `self * a + b`, fused where the hardware has FMA.
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// The larger value; NaN loses, as in `f32::max`.
    fn max(self, other: Self) -> Self;
    fn min(self, other: Self) -> Self;
    fn is_finite(self) -> bool;
}

macro_rules! impl_float {
    ($t:ty, $dtype:expr) => {
        impl Float for $t {
            const DTYPE: DType = $dtype;
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const EPSILON: Self = <$t>::EPSILON;

            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            fn erf(self) -> Self {
                <$t as ErfImpl>::erf_impl(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn powf(self, exponent: Self) -> Self {
                <$t>::powf(self, exponent)
            }
            #[inline(always)]
            fn recip(self) -> Self {
                <$t>::recip(self)
            }
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                <$t>::mul_add(self, a, b)
            }
            #[inline(always)]
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            #[inline(always)]
            fn min(self, other: Self) -> Self {
                <$t>::min(self, other)
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
        }
    };
}

impl_float!(f32, DType::F32);
impl_float!(f64, DType::F64);

/// libm's error function for each width (f32 uses the single-precision one).
trait ErfImpl {
    fn erf_impl(self) -> Self;
}
impl ErfImpl for f32 {
    fn erf_impl(self) -> Self {
        libm::erff(self)
    }
}
impl ErfImpl for f64 {
    fn erf_impl(self) -> Self {
        libm::erf(self)
    }
}
