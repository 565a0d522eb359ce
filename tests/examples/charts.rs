//! BENCHMARKS.md's charts, drawn from the CSV files the benchmark scripts write in
//! `target/bench/` (a chart whose data is missing is skipped, with a message):
//!   latency.csv  scripts/bench.sh        added latency p50/p99 per arm
//!   memory.csv   scripts/memory.sh       RSS over the soak
//!   fleet.csv    --bench fleet_arm       the fleet's PTU utilization over time
//!
//! Run: `cargo run -p spillway-tests --example charts` (or `scripts/charts.sh`); writes
//! `docs/bench/*.svg`.

use std::path::Path;

use plotters::prelude::*;

/// Both relative to the workspace root (the directory above this crate).
const DATA: &str = "target/bench";
const OUT: &str = "docs/bench";

fn at_root(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}
const SIZE: (u32, u32) = (720, 400);

type Chart = Result<(), Box<dyn std::error::Error>>;
/// A chart: its CSV, the command that writes it, and how it is drawn.
type Drawing = (&'static str, &'static str, fn(&[Vec<String>]) -> Chart);

fn rows(name: &str) -> Option<Vec<Vec<String>>> {
    let text = std::fs::read_to_string(at_root(DATA).join(name)).ok()?;
    Some(
        text.lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.split(',').map(str::to_string).collect())
            .collect(),
    )
}

/// The series' legend, boxed, at `position`.
fn legend<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    position: SeriesLabelPosition,
) -> Chart
where
    X: Ranged,
    Y: Ranged,
{
    chart
        .configure_series_labels()
        .position(position)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    Ok(())
}

fn num(s: &str) -> Option<f64> {
    s.trim().parse().ok()
}

/// Added latency per arm, p50 and p99, on a log scale (a peer's milliseconds and a proxy's
/// microseconds on one chart).
fn latency(data: &[Vec<String>]) -> Chart {
    let arms: Vec<(String, f64, f64)> = data
        .iter()
        .filter_map(|r| Some((r[0].clone(), num(&r[1])?.max(1.0), num(&r[2])?.max(1.0))))
        .collect();
    let top = arms.iter().map(|a| a.2).fold(10.0, f64::max) * 3.0;
    let path = at_root(OUT).join("latency.svg");
    let root = SVGBackend::new(&path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Added latency over the backend alone (1 connection)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..arms.len() as f64, (1f64..top).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(arms.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < arms.len() {
                arms[i].0.clone()
            } else {
                String::new()
            }
        })
        .y_desc("µs (log scale)")
        .draw()?;
    let p50 = RGBColor(66, 133, 244);
    let p99 = RGBColor(234, 67, 53);
    chart
        .draw_series(arms.iter().enumerate().map(|(i, a)| {
            let x = i as f64;
            Rectangle::new([(x + 0.15, 1.0), (x + 0.48, a.1)], p50.filled())
        }))?
        .label("p50")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], p50.filled()));
    chart
        .draw_series(arms.iter().enumerate().map(|(i, a)| {
            let x = i as f64;
            Rectangle::new([(x + 0.52, 1.0), (x + 0.85, a.2)], p99.filled())
        }))?
        .label("p99")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], p99.filled()));
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present()?;
    Ok(())
}

/// RSS over the soak, with the idle and 1,000-stream figures as reference lines.
fn memory(data: &[Vec<String>]) -> Chart {
    let mib = |r: &Vec<String>| num(&r[2]).map(|k| k / 1024.0);
    let soak: Vec<(f64, f64)> = data
        .iter()
        .filter(|r| r[0] == "soak")
        .filter_map(|r| Some((num(&r[1])?, mib(r)?)))
        .collect();
    let phase = |name: &str| data.iter().rev().filter(|r| r[0] == name).find_map(mib);
    let (idle, streams) = (phase("idle"), phase("streams"));
    let end = soak.last().map_or(10.0, |s| s.0);
    let top = soak
        .iter()
        .map(|s| s.1)
        .chain(idle)
        .chain(streams)
        .fold(64.0, f64::max)
        * 1.15;
    let path = at_root(OUT).join("memory.svg");
    let root = SVGBackend::new(&path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Resident memory of one replica (embedded store)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..end, 0f64..top)?;
    chart
        .configure_mesh()
        .x_desc("seconds of the soak (2,000 requests/s)")
        .y_desc("MiB")
        .draw()?;
    let blue = RGBColor(66, 133, 244);
    chart
        .draw_series(LineSeries::new(soak.iter().copied(), blue.stroke_width(2)))?
        .label("RSS during the soak")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue));
    for (value, label, color) in [
        (idle, "idle", RGBColor(52, 168, 83)),
        (streams, "1,000 streams open", RGBColor(234, 67, 53)),
        (
            Some(64.0),
            "target with 1,000 streams",
            RGBColor(120, 120, 120),
        ),
    ] {
        if let Some(v) = value {
            chart
                .draw_series(LineSeries::new([(0.0, v), (end, v)], color.stroke_width(1)))?
                .label(format!("{label} ({v:.1} MiB)"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present()?;
    Ok(())
}

/// The fleet's PTU use per minute-long window, and the 429s, over time.
fn fleet(data: &[Vec<String>]) -> Chart {
    let window: Vec<(f64, f64)> = data
        .iter()
        .filter_map(|r| Some((num(&r[0])?, num(r.get(6)?)? * 100.0)))
        .collect();
    let upstream: Vec<(f64, f64)> = data
        .iter()
        .filter_map(|r| Some((num(&r[0])?, num(&r[3])?)))
        .collect();
    let clients: Vec<(f64, f64)> = data
        .iter()
        .filter_map(|r| Some((num(&r[0])?, num(&r[4])?)))
        .collect();
    let end = data.last().and_then(|r| num(&r[0])).unwrap_or(60.0);
    let path = at_root(OUT).join("fleet.svg");
    let root = SVGBackend::new(&path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Three replicas on Redis, offered 2x the PTU's budget",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..end, 0f64..120f64)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("PTU budget used in the last minute (%) / 429s so far")
        .draw()?;
    let series = [
        (window, "PTU use, last 60 s (%)", RGBColor(66, 133, 244)),
        (upstream, "PTU 429s to the gateway", RGBColor(251, 188, 5)),
        (clients, "429s to clients", RGBColor(234, 67, 53)),
    ];
    for (points, label, color) in series {
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present()?;
    Ok(())
}

fn main() {
    std::fs::create_dir_all(at_root(OUT)).expect("docs/bench");
    let charts: [Drawing; 3] = [
        ("latency.csv", "scripts/bench.sh", latency),
        ("memory.csv", "scripts/memory.sh", memory),
        (
            "fleet.csv",
            "cargo bench -p spillway-tests --bench fleet_arm",
            fleet,
        ),
    ];
    for (csv, producer, draw) in charts {
        match rows(csv) {
            Some(data) if !data.is_empty() => match draw(&data) {
                Ok(()) => println!("{OUT}/{} from {DATA}/{csv}", csv.replace(".csv", ".svg")),
                Err(e) => eprintln!("{csv}: {e}"),
            },
            _ => eprintln!("{DATA}/{csv} missing: run {producer} first; chart skipped"),
        }
    }
}
