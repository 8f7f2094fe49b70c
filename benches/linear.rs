//! The CPU linear kernels (`runtime::cpu::kernels::linear_rows`) against candle's matmul, on the
//! default model's projection shapes, for 1 to 256 rows: GFLOP/s of each, best of several runs.
//!
//! `cargo bench --bench linear`; `LORAPLEX_CPU_KERNELS=avx2` caps the instruction set (run it
//! both ways to compare AVX2 and AVX-512 on one machine). On a busy machine, time by the
//! process's CPU time instead of the clock: `LORAPLEX_BENCH_CPU_TIME=1 RAYON_NUM_THREADS=1`
//! (one thread, so no time is spent waiting for a core or spinning).

use candle_core::{Device, Tensor};
use loraplex::runtime::cpu::kernels::{isa, linear_rows, JobWeight, LinearJob};
use std::time::Instant;

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// CPU seconds used by this process so far.
fn cpu_time() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Best seconds per call of `f` over `reps` calls (after one warm-up), by the clock or, with
/// `LORAPLEX_BENCH_CPU_TIME=1`, by CPU time.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    let by_cpu = std::env::var("LORAPLEX_BENCH_CPU_TIME").is_ok_and(|v| v == "1");
    f();
    (0..reps)
        .map(|_| {
            let (t, c) = (Instant::now(), cpu_time());
            f();
            match by_cpu {
                true => cpu_time() - c,
                false => t.elapsed().as_secs_f64(),
            }
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> anyhow::Result<()> {
    loraplex::init_threads();
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    println!("instruction set: {:?}", isa());
    println!("| shape (k → n) | rows | loraplex GFLOP/s | candle GFLOP/s | loraplex vs candle |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (k, n) in [(576, 576), (576, 1536), (1536, 576)] {
        let w = randn(n * k, 1);
        let wt = Tensor::from_slice(&w, (n, k), &Device::Cpu)?;
        for m in [1, 16, 32, 64, 256] {
            let x = randn(m * k, 2);
            let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu)?;
            let reps = (2000 / m).clamp(5, 200);
            let ours = best(reps, || {
                let job = LinearJob {
                    x: &x,
                    m,
                    k,
                    w: JobWeight::F32(&w),
                    n,
                    bias: None,
                    low_rank: vec![],
                };
                std::hint::black_box(linear_rows(&[job]).ok());
            });
            let theirs = best(reps, || {
                std::hint::black_box(xt.matmul(&wt.t().unwrap()).ok());
            });
            let flops = 2.0 * (m * n * k) as f64;
            println!(
                "| {k} → {n} | {m} | {:.1} | {:.1} | {:.2}x |",
                flops / ours / 1e9,
                flops / theirs / 1e9,
                theirs / ours
            );
        }
    }
    Ok(())
}
