//! The benchmark's plots, as SVG: throughput against client count, and latency CDFs.

use std::collections::BTreeMap;
use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

use crate::results::{BenchResult, ChainResult};

fn color(i: usize) -> RGBColor {
    const PALETTE: [RGBColor; 6] = [
        RGBColor(0x1f, 0x77, 0xb4),
        RGBColor(0xd6, 0x27, 0x28),
        RGBColor(0x2c, 0xa0, 0x2c),
        RGBColor(0xff, 0x7f, 0x0e),
        RGBColor(0x94, 0x67, 0xbd),
        RGBColor(0x8c, 0x56, 0x4b),
    ];
    PALETTE[i % PALETTE.len()]
}

fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing plot: {e}")
}

/// Ops/s against clients, one line per target and workload.
pub fn throughput(path: &Path, results: &[BenchResult]) -> anyhow::Result<()> {
    let mut series: BTreeMap<(String, String), Vec<(f64, f64)>> = BTreeMap::new();
    for r in results {
        series.entry((r.target.clone(), r.workload.clone())).or_default().push((r.clients as f64, r.ops_per_sec));
    }
    let max_x = results.iter().map(|r| r.clients).max().unwrap_or(1) as f64;
    let max_y = results.iter().map(|r| r.ops_per_sec).fold(1.0, f64::max) * 1.1;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("throughput (ops/s) by client count", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0.8f64..max_x * 1.25).log_scale(), 0f64..max_y)
        .map_err(plot_err)?;
    chart.configure_mesh().x_desc("clients").y_desc("ops/s").draw().map_err(plot_err)?;
    for (i, ((target, workload), mut points)) in series.into_iter().enumerate() {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let c = color(i);
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
            .map_err(plot_err)?
            .label(format!("{target} {workload}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, c.filled()))).map_err(plot_err)?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Latency CDF (percentile against latency, log scale) for every run.
pub fn latency_cdf(path: &Path, runs: &[(BenchResult, Histogram<u64>)]) -> anyhow::Result<()> {
    let max_us = runs.iter().map(|(_, h)| h.max()).max().unwrap_or(1).max(10) as f64;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("latency CDF", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((1f64..max_us * 1.5).log_scale(), 0f64..100f64)
        .map_err(plot_err)?;
    chart.configure_mesh().x_desc("latency (µs)").y_desc("percentile").draw().map_err(plot_err)?;
    for (i, (r, h)) in runs.iter().enumerate() {
        if h.is_empty() {
            continue;
        }
        let points: Vec<(f64, f64)> = (0..=200)
            .map(|k| {
                let q = f64::from(k) / 200.0;
                (h.value_at_quantile(q).max(1) as f64, q * 100.0)
            })
            .collect();
        let c = color(i);
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(2)))
            .map_err(plot_err)?
            .label(format!("{} {} x{}", r.target, r.workload, r.clients))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// The chain benchmark: p50 end-to-end latency against the added round trip, one line per
/// variant (a variant measured at one delay only is a single point).
pub fn chain(path: &Path, results: &[ChainResult]) -> anyhow::Result<()> {
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for r in results {
        series.entry(r.variant.clone()).or_default().push((r.rtt_ms as f64, r.p50_us as f64 / 1000.0));
    }
    let max_x = results.iter().map(|r| r.rtt_ms).max().unwrap_or(1).max(1) as f64;
    let max_y = results.iter().map(|r| r.p50_us as f64 / 1000.0).fold(1.0, f64::max) * 1.1;
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let steps = results.first().map_or(0, |r| r.steps);
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{steps}-step chain: p50 end-to-end latency by added client round trip"), ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5f64..max_x * 1.1 + 0.5, 0f64..max_y)
        .map_err(plot_err)?;
    chart.configure_mesh().x_desc("added RTT (ms)").y_desc("p50 (ms)").draw().map_err(plot_err)?;
    for (i, (variant, mut points)) in series.into_iter().enumerate() {
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let c = color(i);
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
            .map_err(plot_err)?
            .label(variant)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart.draw_series(points.into_iter().map(|p| Circle::new(p, 4, c.filled()))).map_err(plot_err)?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}
