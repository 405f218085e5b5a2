//! The CUDA probe never panics: with a GPU it describes the device and the embedded kernels run correctly on it;
//! without one it returns `Error::CudaUnavailable` naming what it tried.
//!
//! Whether a GPU is expected comes from outside the code under test: ZEROCONV_EXPECT_GPU=1 or 0 when set,
//! otherwise the presence of the NVIDIA driver's control device /dev/nvidiactl.

use std::path::Path;

use zeroconv::engine::cuda::{self, CudaDevice};
use zeroconv::engine::device::{Arg, Device, KernelRef, Launch, LaunchDims};
use zeroconv::Error;

fn gpu_expected() -> bool {
    match std::env::var("ZEROCONV_EXPECT_GPU").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => Path::new("/dev/nvidiactl").exists(),
    }
}

#[test]
fn probe_finds_the_gpu_or_reports_cuda_unavailable() {
    let result = cuda::probe();
    if gpu_expected() {
        let info = result.unwrap_or_else(|e| panic!("a GPU is expected but probe failed: {e}"));
        println!("{info:?}");
        assert!(info.device_count >= 1);
        assert!(!info.name.trim().is_empty());
        assert!(info.compute_capability.0 >= 1, "compute capability {:?}", info.compute_capability);
        assert!(info.total_memory_bytes > 0);
        assert!(info.driver_version.0 >= 11, "driver supports CUDA {:?}", info.driver_version);
    } else {
        match result {
            Err(Error::CudaUnavailable(msg)) => {
                println!("CudaUnavailable: {msg}");
                // When no driver library loads, the message must name the libraries it tried.
                if msg.starts_with("no CUDA driver found") {
                    assert!(msg.contains("libcuda.so.1") && msg.contains("libcuda.so,"), "unhelpful message: {msg}");
                }
            }
            Err(other) => panic!("expected CudaUnavailable without a GPU, got another error: {other}"),
            Ok(info) => panic!("no GPU expected, but probe found {info:?}; set ZEROCONV_EXPECT_GPU=1"),
        }
    }
}

#[test]
fn probe_is_repeatable_and_thread_safe() {
    let first = cuda::probe().map_err(|e| e.to_string());
    let others: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(|| cuda::probe().map_err(|e| e.to_string())))
        .map(|h| h.join().expect("probe panicked in a thread"))
        .collect();
    for other in others {
        assert_eq!(other, first);
    }
}

#[test]
fn a_missing_device_ordinal_is_cuda_unavailable() {
    match cuda::probe_device(1 << 20) {
        Err(Error::CudaUnavailable(msg)) => assert!(!msg.is_empty()),
        other => panic!("expected CudaUnavailable for device 1048576, got {other:?}"),
    }
}

#[test]
fn opening_a_device_loads_the_kernels_and_they_match_the_host() {
    let opened = CudaDevice::open(0);
    if !gpu_expected() {
        match opened {
            Err(Error::CudaUnavailable(_)) => return,
            Err(other) => panic!("expected CudaUnavailable without a GPU, got {other}"),
            Ok(_) => panic!("no GPU expected, but a device opened; set ZEROCONV_EXPECT_GPU=1"),
        }
    }
    let mut device = opened.unwrap_or_else(|e| panic!("opening the GPU failed: {e}"));
    println!("{:?}, running the {} build", device.probe_info(), device.arch().name());
    for lib in device.libraries() {
        println!("{lib}");
    }
    device.load_all_shipped().unwrap_or_else(|e| panic!("loading the kernel modules failed: {e}"));
    for m in zeroconv::kernels::MODULES {
        for name in m.entry_points(device.arch()) {
            device.has_kernel(m.name, name).unwrap_or_else(|e| panic!("kernel {name} is not loadable: {e}"));
        }
    }
    assert!(device.has_kernel("unary", "no_such_kernel").is_err());

    // silu through the seam: 2 blocks of 128 threads for 1000 elements exercise the grid-stride loop.
    let n = 1000usize;
    let x: Vec<f32> = (0..n).map(|i| (i as f32 - 500.0) / 40.0).collect();
    let xp = device.alloc(4 * n as u64, "x").unwrap();
    let yp = device.alloc(4 * n as u64, "y").unwrap();
    device.upload(xp, bytemuck::cast_slice(&x)).unwrap();
    let launch = Launch {
        kernel: KernelRef { module: "unary".into(), name: "unary_silu_f32".into() },
        dims: LaunchDims::linear(2, 128),
        args: vec![Arg::Ptr(xp), Arg::Ptr(yp), Arg::u64(n as u64)],
        any_grid: true,
    };
    device.launch(&launch).unwrap();
    let mut y = vec![0f32; n];
    device.download(bytemuck::cast_slice_mut(&mut y), yp).unwrap();
    let worst = x
        .iter()
        .zip(&y)
        .map(|(&a, &b)| (f64::from(a) / (1.0 + (-f64::from(a)).exp()) - f64::from(b)).abs())
        .fold(0.0, f64::max);
    println!("unary_silu_f32: max abs error {worst:.2e}");
    assert!(worst <= 1e-5, "silu differs from the host by {worst}");

    // A wrong argument list is refused before the driver sees it.
    let mut bad = launch.clone();
    bad.args.pop();
    let e = device.launch(&bad).unwrap_err().to_string();
    assert!(e.contains("PTX takes"), "{e}");
}
