//! TEMPORARY naive convolution with the agreed shape; replaced by im2col + GEMM.
use super::float::Float;

#[derive(Clone, Copy, Debug)]
pub struct ConvGeom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
    pub ho: usize,
    pub wo: usize,
}

impl ConvGeom {
    fn at(&self, oh: usize, ow: usize, i: usize, j: usize) -> Option<(usize, usize)> {
        let y = (oh * self.stride + i) as isize - self.pad as isize;
        let x = (ow * self.stride + j) as isize - self.pad as isize;
        (y >= 0 && x >= 0 && (y as usize) < self.h && (x as usize) < self.w).then_some((y as usize, x as usize))
    }
}

pub fn forward_scratch_len(_g: &ConvGeom) -> usize {
    0
}
pub fn backward_input_scratch_len(_g: &ConvGeom) -> usize {
    0
}
pub fn backward_weight_scratch_len(_g: &ConvGeom) -> usize {
    0
}

pub fn forward<T: Float>(g: &ConvGeom, x: &[T], w: &[T], bias: Option<&[T]>, y: &mut [T], _scratch: &mut [T]) {
    for b in 0..g.n {
        for o in 0..g.o {
            for oh in 0..g.ho {
                for ow in 0..g.wo {
                    let mut s = bias.map_or(T::ZERO, |bb| bb[o]);
                    for c in 0..g.c {
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                if let Some((yy, xx)) = g.at(oh, ow, i, j) {
                                    s += x[((b * g.c + c) * g.h + yy) * g.w + xx]
                                        * w[((o * g.c + c) * g.kh + i) * g.kw + j];
                                }
                            }
                        }
                    }
                    y[((b * g.o + o) * g.ho + oh) * g.wo + ow] = s;
                }
            }
        }
    }
}

pub fn backward_input<T: Float>(g: &ConvGeom, dy: &[T], w: &[T], dx: &mut [T], _scratch: &mut [T]) {
    dx.fill(T::ZERO);
    for b in 0..g.n {
        for o in 0..g.o {
            for oh in 0..g.ho {
                for ow in 0..g.wo {
                    let d = dy[((b * g.o + o) * g.ho + oh) * g.wo + ow];
                    for c in 0..g.c {
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                if let Some((yy, xx)) = g.at(oh, ow, i, j) {
                                    dx[((b * g.c + c) * g.h + yy) * g.w + xx] +=
                                        d * w[((o * g.c + c) * g.kh + i) * g.kw + j];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

pub fn backward_weight<T: Float>(g: &ConvGeom, x: &[T], dy: &[T], dw: &mut [T], _scratch: &mut [T]) {
    dw.fill(T::ZERO);
    for b in 0..g.n {
        for o in 0..g.o {
            for oh in 0..g.ho {
                for ow in 0..g.wo {
                    let d = dy[((b * g.o + o) * g.ho + oh) * g.wo + ow];
                    for c in 0..g.c {
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                if let Some((yy, xx)) = g.at(oh, ow, i, j) {
                                    dw[((o * g.c + c) * g.kh + i) * g.kw + j] +=
                                        d * x[((b * g.c + c) * g.h + yy) * g.w + xx];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
