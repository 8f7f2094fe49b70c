//! The loss-curve PNG written at the end of training (train loss in blue, validation in red).

use anyhow::Result;
use plotters::prelude::*;
use std::path::Path;

/// Reads `metrics.jsonl` and draws the curves into `png`.
pub fn loss_curve(metrics: &Path, png: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics)?;
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v["step"].as_f64() else {
            continue;
        };
        if let Some(l) = v["loss"].as_f64() {
            train.push((step, l));
        }
        if let Some(l) = v["val_loss"].as_f64() {
            val.push((step, l));
        }
    }
    if train.is_empty() {
        return Ok(());
    }
    let max_x = train.iter().chain(&val).map(|p| p.0).fold(1.0, f64::max);
    let max_y = train
        .iter()
        .chain(&val)
        .map(|p| p.1)
        .filter(|y| y.is_finite())
        .fold(0.0, f64::max)
        * 1.05;
    let root = BitMapBackend::new(png, (800, 480)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    let area = root.margin(20, 20, 20, 20);
    let mut chart = ChartBuilder::on(&area)
        .build_cartesian_2d(0.0..max_x, 0.0..max_y.max(1e-6))
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    chart
        .draw_series(LineSeries::new(train, &BLUE))
        .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    if !val.is_empty() {
        chart
            .draw_series(LineSeries::new(val, RED.stroke_width(3)))
            .map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("plot: {e}"))?;
    Ok(())
}
