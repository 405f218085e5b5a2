//! The tensor-core probe kernels (kernels/mma_probe.cu) run through the device seam, so the same launches can be
//! made on the emulated device (tests/emulated/mma_emulated.rs checks them against the PTX ISA's tables) and on a
//! GPU (tests/gpu_check.rs compares its bytes with the emulator's). Every input is exact in bf16 and f16 and every
//! product sums integers below 2^24, so any accumulation order gives the same bits: a difference can only be a
//! misplaced fragment element.

use zeroconv::engine::device::{Arg, DevPtr, Device, KernelRef, Launch, LaunchDims, ModuleSource};
use zeroconv::engine::HostTensor;
use zeroconv::graph::{DType, Shape};

/// The ldmatrix tile: element (row r, column c) of the 32-row tile holds 256 r + c, a bit pattern that says where
/// it came from.
pub fn ldmatrix_tile() -> Vec<u16> {
    (0..32 * 8).map(|e| (256 * (e / 8) + e % 8) as u16).collect()
}

/// Where row r of the tile sits in shared memory: slot (7 r + 3) mod 32, so row addresses are not consecutive.
pub fn ldmatrix_slots() -> Vec<i32> {
    (0..32).map(|r| (7 * r + 3) % 32).collect()
}

/// (row, column) of accumulator `i` (0..4) of `lane` in a 16x8 tile, as the PTX ISA's m16n8k16 table gives it (written
/// from the table, not from kernels/mma.cuh).
pub fn c_fragment(lane: usize, i: usize) -> (usize, usize) {
    let (group, thread) = (lane >> 2, lane % 4);
    (if i < 2 { group } else { group + 8 }, thread * 2 + (i & 1))
}

/// One m16n8k16 case: (name, A 16x16, B 16x8, C 16x8), row-major.
pub type MmaCase = (&'static str, Vec<f64>, Vec<f64>, Vec<f64>);

/// Coded A times column selectors of B (D = A's left or right half), and the identity times coded B plus coded C.
pub fn mma_cases() -> Vec<MmaCase> {
    let coded_a: Vec<f64> = (0..256).map(|e| e as f64).collect();
    let lower_b: Vec<f64> = (0..128).map(|e| ((e / 8) == (e % 8)) as u8 as f64).collect();
    let upper_b: Vec<f64> = (0..128).map(|e| ((e / 8) == (e % 8) + 8) as u8 as f64).collect();
    let identity_a: Vec<f64> = (0..256).map(|e| ((e / 16) == (e % 16)) as u8 as f64).collect();
    let coded_b: Vec<f64> = (0..128).map(|e| e as f64).collect();
    let zero_c = vec![0.0; 128];
    let coded_c: Vec<f64> = (0..128).map(|e| 1000.0 * e as f64).collect();
    vec![
        ("coded A x lower selector", coded_a.clone(), lower_b, zero_c.clone()),
        ("coded A x upper selector", coded_a, upper_b, zero_c),
        ("identity x coded B + coded C", identity_a, coded_b, coded_c),
    ]
}

/// Little-endian bytes of 16- and 32-bit values, as the device stores them.
fn le_bytes<const N: usize, T: Copy>(v: &[T], bytes: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| bytes(x)).collect()
}

fn half(dtype: DType, data: &[f64]) -> Vec<u8> {
    HostTensor::from_f64(Shape(vec![data.len()]), dtype, data).expect("data fills shape").bytes
}

struct Probe<'d, D: Device> {
    dev: &'d mut D,
}

impl<D: Device> Probe<'_, D> {
    fn buffer(&mut self, what: &str, bytes: &[u8]) -> DevPtr {
        let p = self.dev.alloc(bytes.len() as u64, what).unwrap_or_else(|e| panic!("alloc {what}: {e}"));
        self.dev.upload(p, bytes).unwrap_or_else(|e| panic!("upload {what}: {e}"));
        p
    }

    fn launch(&mut self, name: &str, args: Vec<Arg>) {
        let kernel = KernelRef { module: "mma_probe".into(), name: name.into() };
        let dims = LaunchDims { grid: [1, 1, 1], block: [32, 1, 1], shared_bytes: 0 };
        self.dev.launch(&Launch { kernel, dims, args, any_grid: false }).unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    fn read(&mut self, p: DevPtr, bytes: usize) -> Vec<u8> {
        let mut out = vec![0u8; bytes];
        self.dev.download(&mut out, p).unwrap_or_else(|e| panic!("download: {e}"));
        out
    }
}

/// Runs every probe on `dev` and returns (what, output bytes): `probe_ldmatrix`'s registers (6 variants x 32 lanes
/// x 4, u32), then for bf16 and f16 and each of [`mma_cases`] and both ways of loading B, D as fragments (32 lanes x
/// 4, f32, lane-major).
pub fn run<D: Device>(dev: &mut D) -> Vec<(String, Vec<u8>)> {
    let module = zeroconv::kernels::module("mma_probe").expect("kernels/mma_probe.cu is built");
    dev.load_module(&ModuleSource::Shipped(module)).unwrap_or_else(|e| panic!("loading mma_probe: {e}"));
    let mut p = Probe { dev };
    let mut outputs = Vec::new();

    let tile = p.buffer("tile", &le_bytes(&ldmatrix_tile(), u16::to_le_bytes));
    let slots = p.buffer("slots", &le_bytes(&ldmatrix_slots(), i32::to_le_bytes));
    let regs = p.buffer("registers", &vec![0u8; 6 * 32 * 4 * 4]);
    p.launch("probe_ldmatrix", vec![Arg::Ptr(tile), Arg::Ptr(slots), Arg::Ptr(regs)]);
    outputs.push(("ldmatrix registers".to_string(), p.read(regs, 6 * 32 * 4 * 4)));

    for (dtype, kernel) in [(DType::BF16, "mma_tile_bf16"), (DType::F16, "mma_tile_f16")] {
        for (case, a, b, c) in mma_cases() {
            let bt: Vec<f64> = (0..128).map(|e| b[(e % 16) * 8 + e / 16]).collect();
            // C as fragments, lane-major, through the accumulator table.
            let c_frag: Vec<f32> = (0..128)
                .map(|e| {
                    let (row, col) = c_fragment(e / 4, e % 4);
                    c[row * 8 + col] as f32
                })
                .collect();
            let (ab, bb, btb) =
                (p.buffer("a", &half(dtype, &a)), p.buffer("b", &half(dtype, &b)), p.buffer("bt", &half(dtype, &bt)));
            let cb = p.buffer("c", &le_bytes(&c_frag, f32::to_le_bytes));
            for b_from_rows in [0, 1] {
                let d = p.buffer("d", &[0xffu8; 128 * 4]);
                let args =
                    vec![Arg::Ptr(ab), Arg::Ptr(bb), Arg::Ptr(btb), Arg::Ptr(cb), Arg::Ptr(d), Arg::i32(b_from_rows)];
                p.launch(kernel, args);
                outputs.push((format!("{kernel}, {case}, B by rows {b_from_rows}"), p.read(d, 128 * 4)));
            }
        }
    }
    outputs
}
