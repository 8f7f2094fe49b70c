//! NF4 kernels vs candle's f32 matmul on the default model's linear shapes (SmolLM2-135M:
//! hidden 576, 3 KV heads of 64, intermediate 1536).
//!
//! `cargo bench --bench nf4`. Prints, per shape, the time of `x W^T` for 1 row (decode) and 32 rows
//! (a batch of 32 streams), the fused/tiled crossover, and a "whole model" pass: every linear layer
//! of 30 blocks once (f32 weights: 425 MB, far beyond the caches, as in real decode). Knobs:
//! `LORAPLEX_BENCH_RUNS` (repeats, the fastest is reported; default 7), `LORAPLEX_BENCH_LAYERS` (blocks
//! in the whole-model pass; default 30), `LORAPLEX_BENCH_ONLY` (one section: `layers`,
//! `crossover`, `micro` or `model`), `LORAPLEX_BENCH_ROWS` (batch sizes of the whole-model pass,
//! comma-separated; default `1,32`).

use candle_core::{Device, Tensor};
use loraplex::quant::kernels::{simd_available, KernelPath, FUSED_MAX_ROWS};
use loraplex::quant::{quantize_nf4_double, Nf4Linear};
use std::time::Instant;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn weights(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
        })
        .collect()
}

/// Fastest of `runs` calls of `f` (after one warm-up call): the machine is shared, and the
/// minimum is the number least disturbed by other work.
fn time<F: FnMut()>(runs: usize, mut f: F) -> f64 {
    f();
    (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// [`time`] for several candidates, their runs interleaved so that a burst of outside load hits
/// them alike.
fn time_all(runs: usize, fs: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    let mut best = vec![f64::INFINITY; fs.len()];
    for f in fs.iter_mut() {
        f();
    }
    for _ in 0..runs {
        for (b, f) in best.iter_mut().zip(fs.iter_mut()) {
            let s = Instant::now();
            f();
            *b = b.min(s.elapsed().as_secs_f64());
        }
    }
    best
}

struct Layer {
    dense: Tensor,
    nf4: Nf4Linear,
}

fn layer(rows: usize, cols: usize, seed: u64) -> anyhow::Result<Layer> {
    let w = weights(rows * cols, seed);
    let dense = Tensor::from_slice(&w, (rows, cols), &Device::Cpu)?;
    let nf4 = Nf4Linear::new(quantize_nf4_double(&w, rows, cols, 64)?, None);
    Ok(Layer { dense, nf4 })
}

fn input(n: usize, cols: usize) -> anyhow::Result<Tensor> {
    Ok(Tensor::from_vec(
        weights(n * cols, 7 + n as u64),
        (n, cols),
        &Device::Cpu,
    )?)
}

const SHAPES: [(&str, usize, usize); 4] = [
    ("q/o 576x576", 576, 576),
    ("k/v 192x576", 192, 576),
    ("gate/up 1536x576", 1536, 576),
    ("down 576x1536", 576, 1536),
];

fn main() -> anyhow::Result<()> {
    let runs = env_usize("LORAPLEX_BENCH_RUNS", 7);
    let blocks = env_usize("LORAPLEX_BENCH_LAYERS", 30);
    let only = std::env::var("LORAPLEX_BENCH_ONLY").unwrap_or_default();
    let want = |s: &str| only.is_empty() || only == s;
    println!(
        "AVX2+FMA: {}, rayon threads: {}, fused path up to {FUSED_MAX_ROWS} rows",
        simd_available(),
        rayon::current_num_threads()
    );

    if want("layers") {
        per_layer(runs)?;
    }
    if want("crossover") {
        crossover(runs)?;
    }
    if want("micro") {
        micro(runs)?;
    }
    if want("model") {
        whole_model(runs, blocks)?;
    }
    if want("decode") {
        decode_rows(runs, blocks)?;
    }
    Ok(())
}

fn per_layer(runs: usize) -> anyhow::Result<()> {
    println!(
        "\nper layer (weights hot in cache), fastest of {} interleaved runs:",
        runs * 20
    );
    println!(
        "{:<18} {:>5} {:>11} {:>11} {:>11} {:>8}",
        "shape", "rows", "f32 µs", "nf4 µs", "other µs", "nf4/f32"
    );
    for (name, rows, cols) in SHAPES {
        let l = layer(rows, cols, rows as u64 * 31 + cols as u64)?;
        for n in [1, 32] {
            let x = input(n, cols)?;
            let wt = l.dense.t()?;
            let (mut f, mut q) = (
                || {
                    x.matmul(&wt).unwrap();
                },
                || {
                    l.nf4.forward(&x).unwrap();
                },
            );
            // The path Auto did not take, for comparison.
            let other = match n <= FUSED_MAX_ROWS {
                true => KernelPath::Tiled,
                false => KernelPath::Fused,
            };
            let mut o = || {
                l.nf4.forward_with(&x, other).unwrap();
            };
            let t = time_all(runs * 20, &mut [&mut f, &mut q, &mut o]);
            let (f, q, o) = (t[0], t[1], t[2]);
            println!(
                "{name:<18} {n:>5} {:>11.1} {:>11.1} {:>11.1} {:>7.2}x",
                f * 1e6,
                q * 1e6,
                o * 1e6,
                f / q
            );
        }
    }

    Ok(())
}

fn crossover(runs: usize) -> anyhow::Result<()> {
    println!("\nfused vs tiled crossover on gate/up 1536x576 (µs):");
    let l = layer(1536, 576, 5)?;
    for n in [1, 2, 3, 4, 5, 6, 8, 12, 16] {
        let x = input(n, 576)?;
        let t = time_all(
            runs * 10,
            &mut [
                &mut || {
                    l.nf4.forward_with(&x, KernelPath::Fused).unwrap();
                },
                &mut || {
                    l.nf4.forward_with(&x, KernelPath::Tiled).unwrap();
                },
            ],
        );
        let (fu, ti) = (t[0], t[1]);
        println!(
            "  n={n:>2}: fused {:>8.1}  tiled {:>8.1}",
            fu * 1e6,
            ti * 1e6
        );
    }

    Ok(())
}

/// The kernels alone (no tensor wrapping), per weight, on a layer that stays in L2.
fn micro(runs: usize) -> anyhow::Result<()> {
    use loraplex::quant::kernels::matmul;
    for (rows, cols) in [(192, 576), (24, 4608), (1152, 128)] {
        let w = quantize_nf4_double(&weights(rows * cols, 3), rows, cols, 64)?;
        println!("\nkernels alone on {rows}x{cols} (ns per weight per input row):");
        for path in [
            KernelPath::Fused,
            KernelPath::FusedScalar,
            KernelPath::Tiled,
        ] {
            for n in [1, 4, 32] {
                let x = weights(n * cols, 9);
                let t = time(runs * 50, || {
                    matmul(&w, &x, n, path).unwrap();
                });
                println!(
                    "  {path:?} n={n:>2}: {:>8.1} µs  {:.3} ns",
                    t * 1e6,
                    t * 1e9 / (rows * cols * n) as f64
                );
            }
        }
    }
    Ok(())
}

/// The batch sizes of the whole-model pass: `LORAPLEX_BENCH_ROWS` (comma-separated), else 1 and 32.
fn model_rows() -> Vec<usize> {
    std::env::var("LORAPLEX_BENCH_ROWS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or(vec![1, 32])
}

/// The linear shapes of one block: q, k, v, o, gate, up, down.
const BLOCK: [(usize, usize); 7] = [
    (576, 576),
    (192, 576),
    (192, 576),
    (576, 576),
    (1536, 576),
    (1536, 576),
    (576, 1536),
];

/// Whole model: q, k, v, o, gate, up, down of every block, once per step.
fn whole_model(runs: usize, blocks: usize) -> anyhow::Result<()> {
    let mut model = Vec::new();
    for b in 0..blocks {
        for (i, (rows, cols)) in BLOCK.into_iter().enumerate() {
            model.push(layer(rows, cols, (b * 7 + i) as u64)?);
        }
    }
    let f32_mb: usize = model.iter().map(|l| l.dense.elem_count() * 4).sum();
    let nf4_mb: usize = model.iter().map(|l| l.nf4.weight().resident_bytes()).sum();
    println!(
        "\nwhole model, {blocks} blocks x 7 linear layers: f32 {:.0} MB, nf4+dq {:.1} MB resident",
        f32_mb as f64 / 1e6,
        nf4_mb as f64 / 1e6
    );
    for n in model_rows() {
        let xs: Vec<(Tensor, Tensor)> = [576, 1536]
            .iter()
            .map(|c| (input(n, *c).unwrap(), input(n, *c).unwrap()))
            .collect();
        let pick = |cols: usize| if cols == 576 { &xs[0].0 } else { &xs[1].0 };
        let t = time_all(
            runs,
            &mut [
                &mut || {
                    for l in &model {
                        let x = pick(l.dense.dim(1).unwrap());
                        x.matmul(&l.dense.t().unwrap()).unwrap();
                    }
                },
                &mut || {
                    for l in &model {
                        l.nf4.forward(pick(l.nf4.in_features())).unwrap();
                    }
                },
            ],
        );
        let (f, q) = (t[0], t[1]);
        println!(
            "  {n:>2} rows: f32 {:>8.2} ms/step ({:>8.1} rows/s)   nf4 {:>8.2} ms/step ({:>8.1} rows/s)   nf4/f32 {:.2}x",
            f * 1e3,
            n as f64 / f,
            q * 1e3,
            n as f64 / q,
            f / q
        );
    }
    Ok(())
}

/// The decode row kernel (`dot_rows_into`, int16) vs the exact fused f32 kernel, the `Auto` path
/// and candle's f32 matmul, over every linear layer of `blocks` blocks, single-threaded.
fn decode_rows(runs: usize, blocks: usize) -> anyhow::Result<()> {
    use loraplex::quant::kernels::matmul;
    use loraplex::quant::{dot_rows_into, Nf4Input};
    let mut model = Vec::new();
    for b in 0..blocks {
        for (i, (rows, cols)) in BLOCK.into_iter().enumerate() {
            model.push(layer(rows, cols, (b * 7 + i) as u64)?);
        }
    }
    let weights_per_pass: usize = model.iter().map(|l| l.dense.elem_count()).sum();
    let rows_list: Vec<usize> = std::env::var("LORAPLEX_BENCH_DECODE_ROWS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or(vec![1, 4, 16]);
    println!(
        "\ndecode row kernel, {} layers ({:.1} M weights), one thread; ms per pass (G weights/s):",
        model.len(),
        weights_per_pass as f64 / 1e6
    );
    println!(
        "{:>4} {:>18} {:>18} {:>18} {:>18} {:>9}",
        "rows", "f32 candle", "nf4 auto", "nf4 fused exact", "nf4 int16 (new)", "new/fused"
    );
    for n in rows_list {
        let xs: Vec<Vec<f32>> = [576, 1536]
            .iter()
            .map(|c| weights(n * c, 11 + n as u64))
            .collect();
        let pick = |cols: usize| if cols == 576 { &xs[0] } else { &xs[1] };
        let tensors: Vec<Tensor> = xs
            .iter()
            .zip([576, 1536])
            .map(|(x, c)| Tensor::from_slice(x, (n, c), &Device::Cpu).unwrap())
            .collect();
        let pick_t = |cols: usize| {
            if cols == 576 {
                &tensors[0]
            } else {
                &tensors[1]
            }
        };
        let mut out = vec![0f32; 1536 * n];
        let t = time_all(
            runs,
            &mut [
                &mut || {
                    for l in &model {
                        let x = pick_t(l.dense.dim(1).unwrap());
                        x.matmul(&l.dense.t().unwrap()).unwrap();
                    }
                },
                &mut || {
                    for l in &model {
                        let w = l.nf4.weight();
                        matmul(w, pick(w.cols), n, KernelPath::Auto).unwrap();
                    }
                },
                &mut || {
                    for l in &model {
                        let w = l.nf4.weight();
                        matmul(w, pick(w.cols), n, KernelPath::Fused).unwrap();
                    }
                },
                &mut || {
                    for l in &model {
                        let w = l.nf4.weight();
                        let input = Nf4Input::new(pick(w.cols), n, w.cols);
                        dot_rows_into(w, 0, w.rows, &input, &mut out, n).unwrap();
                    }
                },
            ],
        );
        // The new path's two halves: preparing the inputs, and the kernel on prepared inputs.
        let inputs: Vec<Nf4Input> = [576, 1536]
            .iter()
            .map(|c| Nf4Input::new(pick(*c), n, *c))
            .collect();
        // The same prepared inputs kept to the AVX2 form of the kernel (where the CPU has AVX-512
        // VNNI, the default takes it: same bits, fewer instructions).
        let mut out2 = vec![0f32; 1536 * n];
        let avx2_inputs: Vec<Nf4Input> =
            inputs.iter().map(|i| i.clone().with_vnni(false)).collect();
        let parts = time_all(
            runs,
            &mut [
                &mut || {
                    for l in &model {
                        let w = l.nf4.weight();
                        std::hint::black_box(Nf4Input::new(pick(w.cols), n, w.cols));
                    }
                },
                &mut || {
                    for l in &model {
                        let w = l.nf4.weight();
                        let input = &inputs[usize::from(w.cols != 576)];
                        dot_rows_into(w, 0, w.rows, input, &mut out, n).unwrap();
                    }
                },
                &mut || {
                    for l in &model {
                        let w = l.nf4.weight();
                        let input = &avx2_inputs[usize::from(w.cols != 576)];
                        dot_rows_into(w, 0, w.rows, input, &mut out2, n).unwrap();
                    }
                },
            ],
        );
        let cell = |s: f64| {
            format!(
                "{:>8.2} ({:>6.1})",
                s * 1e3,
                weights_per_pass as f64 / s / 1e9
            )
        };
        println!(
            "{n:>4} {:>18} {:>18} {:>18} {:>18} {:>8.2}x",
            cell(t[0]),
            cell(t[1]),
            cell(t[2]),
            cell(t[3]),
            t[2] / t[3]
        );
        println!(
            "{:>4} new path split: prepare {:.3} ms, kernel {} (VNNI: {}; AVX2 only {}, {:.2}x)",
            "",
            parts[0] * 1e3,
            cell(parts[1]),
            loraplex::quant::kernels::vnni_available(),
            cell(parts[2]),
            parts[2] / parts[1]
        );
    }
    Ok(())
}
