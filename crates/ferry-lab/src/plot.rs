//! PNG plots for `ferry replay --plot`, drawn with plotters' bitmap backend.
//!
//! Text is rasterised by ab_glyph from DejaVu Sans, compiled into the binary from the `dejavu`
//! crate (crates.io, pinned), so plotting needs no system fontconfig or freetype and renders the
//! same on every machine.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use ferry_core::{Error, Result};

const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // DejaVu Sans is a valid TrueType file; a failure here would be a packaging bug.
        if plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_err()
        {
            tracing::warn!("DejaVu Sans did not load; plot text will be missing");
        }
    });
}

fn err(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |e| {
        Error::io(
            format!("drawing {}", path.display()),
            std::io::Error::other(e),
        )
    }
}

/// A named line.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// What `ferry replay --plot` draws.
#[derive(Debug, Clone, Default)]
pub struct ReplayPlot {
    pub title: String,
    /// Unit of the cost axis.
    pub cost_unit: String,
    /// α of the per-request panels.
    pub alpha: f64,
    /// Per policy: (request number, running satisfaction).
    pub satisfaction: Vec<Series>,
    /// Per policy: (request number, cumulative cost).
    pub cost: Vec<Series>,
    /// α sweep (empty for one α): per policy, (α, cost per request) and (α, satisfaction).
    pub sweep_cost: Vec<Series>,
    pub sweep_satisfaction: Vec<Series>,
}

/// At most `max` evenly spaced points (the last one kept), so long replays draw quickly.
fn thin(points: &[(f64, f64)], max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max {
        return points.to_vec();
    }
    let step = points.len().div_ceil(max);
    let mut out: Vec<(f64, f64)> = points.iter().step_by(step).copied().collect();
    if let Some(&last) = points.last() {
        if out.last() != Some(&last) {
            out.push(last);
        }
    }
    out
}

fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    C[i % C.len()]
}

fn range(series: &[Series], skip_head: f64, pad: f64) -> (f64, f64, f64, f64) {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for s in series {
        let head = (s.points.len() as f64 * skip_head) as usize;
        for (i, &(x, y)) in s.points.iter().enumerate() {
            x0 = x0.min(x);
            x1 = x1.max(x);
            if i >= head && y.is_finite() {
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
        }
    }
    if x0 > x1 {
        return (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y0 -= 0.5;
        y1 += 0.5;
    }
    let d = (y1 - y0) * pad;
    (x0, x1, y0 - d, y1 + d)
}

/// Axis numbers: integers without decimals, large values in exponent form.
fn tick(v: &f64) -> String {
    if v.abs() >= 1e5 {
        format!("{v:.1e}")
    } else if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_string()
    }
}

/// One panel of lines. `hlines`: horizontal reference lines; `diagonal`: draw y = x dashed.
#[allow(clippy::too_many_arguments)]
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    y_range: Option<(f64, f64)>,
    diagonal: bool,
    markers: bool,
) -> std::result::Result<(), String> {
    let (x0, x1, mut y0, mut y1) = range(series, 0.05, 0.05);
    if let Some((a, b)) = y_range {
        y0 = y0.max(a);
        y1 = y1.min(b);
    }
    if diagonal {
        y0 = y0.min(x0);
        y1 = y1.max(x1);
    }
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 20))
        .margin(12)
        .margin_right(36)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style((FONT, 14))
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .axis_desc_style((FONT, 15))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(|e| e.to_string())?;
    let clamp = |(x, y): (f64, f64)| (x, y.clamp(y0, y1));
    if diagonal {
        chart
            .draw_series(DashedLineSeries::new(
                [(x0, x0), (x1, x1)].map(clamp),
                8,
                6,
                BLACK.stroke_width(1),
            ))
            .map_err(|e| e.to_string())?
            .label("y = α")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    }
    for (i, s) in series.iter().enumerate() {
        let c = color(i);
        let pts: Vec<(f64, f64)> = thin(&s.points, 2000).into_iter().map(clamp).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(s.name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        if markers {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled())))
                .map_err(|e| e.to_string())?;
        }
    }
    chart
        .configure_series_labels()
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Draws the replay figure: running satisfaction and cumulative cost over requests; with an α
/// sweep, a second row with cost per request and satisfaction against α (and y = α).
pub fn draw_replay(path: &Path, p: &ReplayPlot) -> Result<()> {
    register_font();
    let sweep = !p.sweep_cost.is_empty();
    let size = (1400, if sweep { 1000 } else { 520 });
    let run = || -> std::result::Result<(), String> {
        let root = BitMapBackend::new(path, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let root = root
            .titled(&p.title, (FONT, 22))
            .map_err(|e| e.to_string())?;
        let areas = root.split_evenly((if sweep { 2 } else { 1 }, 2));
        panel(
            &areas[0],
            &format!("running satisfaction (α = {})", p.alpha),
            "request",
            "satisfied so far",
            &p.satisfaction,
            Some((0.0, 1.0)),
            false,
            false,
        )?;
        panel(
            &areas[1],
            "cumulative cost",
            "request",
            &p.cost_unit,
            &p.cost,
            None,
            false,
            false,
        )?;
        if sweep {
            panel(
                &areas[2],
                "cost per request vs α",
                "α (SLA target)",
                &format!("{} per request", p.cost_unit),
                &p.sweep_cost,
                None,
                false,
                true,
            )?;
            panel(
                &areas[3],
                "satisfaction vs α",
                "α (SLA target)",
                "satisfaction",
                &p.sweep_satisfaction,
                Some((0.0, 1.0)),
                true,
                true,
            )?;
        }
        root.present().map_err(|e| e.to_string())
    };
    run().map_err(err(path))
}

/// Draws RouteLLM's figure: performance against strong-model calls (%), one curve per router,
/// with the weak and strong models as horizontal lines.
pub fn draw_routellm(
    path: &Path,
    title: &str,
    perf_desc: &str,
    curves: &[Series],
    weak: f64,
    strong: f64,
) -> Result<()> {
    register_font();
    let run = || -> std::result::Result<(), String> {
        let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let mut all = curves.to_vec();
        all.push(Series {
            name: format!("weak model ({weak:.2})"),
            points: vec![(0.0, weak), (100.0, weak)],
        });
        all.push(Series {
            name: format!("strong model ({strong:.2})"),
            points: vec![(0.0, strong), (100.0, strong)],
        });
        panel(
            &root,
            title,
            "strong model calls (%)",
            perf_desc,
            &all,
            None,
            false,
            true,
        )?;
        root.present().map_err(|e| e.to_string())
    };
    run().map_err(err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick(&100.0), "100");
        assert_eq!(tick(&0.45), "0.45");
        assert_eq!(tick(&2_000_000.0), "2.0e6");
    }

    #[test]
    fn thin_keeps_ends_and_bounds_length() {
        let pts: Vec<(f64, f64)> = (0..10_001).map(|i| (i as f64, 0.0)).collect();
        let t = thin(&pts, 2000);
        assert!(t.len() <= 2001, "{}", t.len());
        assert_eq!(t.first(), Some(&(0.0, 0.0)));
        assert_eq!(t.last(), Some(&(10_000.0, 0.0)));
        assert_eq!(thin(&pts[..5], 2000).len(), 5);
    }

    #[test]
    fn draws_a_png_with_text() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.png");
        let s = |name: &str, k: f64| Series {
            name: name.into(),
            points: (1..200).map(|i| (i as f64, k * i as f64)).collect(),
        };
        let p = ReplayPlot {
            title: "test".into(),
            cost_unit: "J".into(),
            alpha: 0.5,
            satisfaction: vec![s("a", 0.001), s("b", 0.002)],
            cost: vec![s("a", 1.0), s("b", 2.0)],
            sweep_cost: vec![Series {
                name: "a".into(),
                points: vec![(0.4, 1.0), (0.5, 2.0)],
            }],
            sweep_satisfaction: vec![Series {
                name: "a".into(),
                points: vec![(0.4, 0.45), (0.5, 0.52)],
            }],
        };
        draw_replay(&path, &p).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // 1400 x 1000 with the sweep row.
        assert_eq!(&bytes[16..24], &[0, 0, 0x05, 0x78, 0, 0, 0x03, 0xe8]);
    }
}
