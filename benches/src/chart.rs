//! The SVG chart beside the markdown table: one panel per scenario, one bar per
//! gateway configuration (the median), with a line from the minimum to the maximum
//! run. `direct` stays in the table only: next to it the gateways' bars would be
//! too small to compare.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::report::{ConfigResult, METRICS};
use crate::{Kind, Plan};

fn color(kind: Kind) -> RGBColor {
    match kind {
        Kind::Direct => RGBColor(120, 170, 120), // not drawn
        Kind::Ours => RGBColor(20, 60, 150),
        Kind::OursH2 => RGBColor(31, 90, 180),
        Kind::OursHttp1 => RGBColor(110, 160, 220),
        Kind::Stunnel => RGBColor(200, 120, 60),
        Kind::Haproxy => RGBColor(220, 160, 60),
        Kind::Nginx => RGBColor(170, 80, 80),
        Kind::HaproxyPlain => RGBColor(150, 150, 150),
    }
}

pub fn write(path: &Path, plan: &Plan, results: &[ConfigResult]) -> Result<()> {
    let e = |e: &dyn std::fmt::Debug| anyhow!("drawing the chart: {e:?}");
    let root = SVGBackend::new(path, (1800, 1250)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let title = format!(
        "cl-bench: client -> A -> mTLS -> B -> target on 127.0.0.1 · median of {} run{} · bars: median, lines: min-max · direct: see the table",
        plan.runs,
        if plan.runs == 1 { "" } else { "s" }
    );
    let root = root.titled(&title, ("sans-serif", 22)).map_err(|x| e(&x))?;
    let panels = root.split_evenly((3, 3));
    let shown: Vec<&ConfigResult> = results
        .iter()
        .filter(|r| r.kind != Kind::Direct && r.skipped.is_none() && !r.samples.is_empty())
        .collect();
    let names: Vec<&'static str> = shown.iter().map(|r| r.kind.name()).collect();
    let n = shown.len().max(1);
    for (panel, m) in panels.iter().zip(METRICS.iter()) {
        let stats: Vec<_> = shown.iter().map(|r| (r.kind, r.stat(m.get))).collect();
        let ymax = stats
            .iter()
            .filter_map(|(_, s)| s.map(|s| s.max))
            .fold(0.0f64, f64::max)
            .max(1e-9)
            * 1.12;
        let caption = format!(
            "{} ({} is better)",
            m.short,
            if m.higher_is_better {
                "higher"
            } else {
                "lower"
            }
        );
        let mut chart = ChartBuilder::on(panel)
            .caption(caption, ("sans-serif", 17))
            .margin(12)
            .x_label_area_size(28)
            .y_label_area_size(58)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..ymax)
            .map_err(|x| e(&x))?;
        let label = |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                names.get(i as usize).copied().unwrap_or("").to_owned()
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n + 1)
            .x_label_formatter(&label)
            .x_label_style(("sans-serif", 12))
            .y_label_style(("sans-serif", 12))
            .draw()
            .map_err(|x| e(&x))?;
        let bars = stats.iter().enumerate().filter_map(|(i, (k, s))| {
            let s = (*s)?;
            let x = i as f64;
            Some(Rectangle::new(
                [(x - 0.35, 0.0), (x + 0.35, s.median)],
                color(*k).filled(),
            ))
        });
        chart.draw_series(bars).map_err(|x| e(&x))?;
        let whiskers = stats.iter().enumerate().filter_map(|(i, (_, s))| {
            let s = (*s)?;
            let x = i as f64;
            (s.n > 1).then(|| PathElement::new(vec![(x, s.min), (x, s.max)], BLACK.stroke_width(2)))
        });
        chart.draw_series(whiskers).map_err(|x| e(&x))?;
        let values = stats.iter().enumerate().filter_map(|(i, (_, s))| {
            let s = (*s)?;
            Some(Text::new(
                format!("{:.d$}", s.median, d = m.decimals),
                (i as f64 - 0.3, s.median + ymax * 0.01),
                ("sans-serif", 11),
            ))
        });
        chart.draw_series(values).map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
