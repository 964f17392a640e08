//! Small inline-SVG charts for the HTML report: no JavaScript, no fonts to fetch, readable as text.
//!
//! Hand-written because the report must be one self-contained file: plotting crates (plotters) draw into
//! their own backends and bring font handling; these three chart shapes are a few dozen lines each.

use std::fmt::Write;

const W: f64 = 420.0;
const H: f64 = 260.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 40.0;
/// Series colours (colour-blind-safe, Okabe–Ito).
const COLOURS: [&str; 6] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9",
];

/// Escapes text for HTML and SVG.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A short number for axis ticks and labels.
pub fn short(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1e4 || v.abs() < 1e-3 {
        format!("{v:.2e}")
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

/// Data range with a margin; a single value gets a unit-wide range.
fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

struct Frame {
    x: (f64, f64),
    y: (f64, f64),
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        LEFT + (x - self.x.0) / (self.x.1 - self.x.0) * (W - LEFT - RIGHT)
    }
    fn py(&self, y: f64) -> f64 {
        H - BOTTOM - (y - self.y.0) / (self.y.1 - self.y.0) * (H - TOP - BOTTOM)
    }

    /// Opening tag, title, axes with three ticks each (x ticks unless `x_ticks` is false), axis labels.
    fn open(&self, title: &str, x_label: &str, y_label: &str, x_ticks: bool) -> String {
        let mut s = format!(
            r#"<svg class="chart" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img"><title>{t}</title><text x="{cx}" y="16" text-anchor="middle" class="ct">{t}</text>"#,
            t = escape(title),
            cx = W / 2.0
        );
        let (x0, x1, y0, y1) = (LEFT, W - RIGHT, TOP, H - BOTTOM);
        let _ = write!(
            s,
            r##"<path d="M{x0} {y0}V{y1}H{x1}" fill="none" stroke="#444"/>"##
        );
        for i in 0..3 {
            let f = i as f64 / 2.0;
            let (xv, yv) = (
                self.x.0 + f * (self.x.1 - self.x.0),
                self.y.0 + f * (self.y.1 - self.y.0),
            );
            if x_ticks {
                let _ = write!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" class="tk">{}</text>"#,
                    self.px(xv),
                    y1 + 14.0,
                    short(xv)
                );
            }
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end" class="tk">{}</text>"#,
                x0 - 4.0,
                self.py(yv) + 4.0,
                short(yv)
            );
        }
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" class="al">{}</text><text transform="translate(12 {:.1}) rotate(-90)" text-anchor="middle" class="al">{}</text>"#,
            (x0 + x1) / 2.0,
            H - 6.0,
            escape(x_label),
            (y0 + y1) / 2.0,
            escape(y_label)
        );
        s
    }
}

/// Lines through points, one per named series, with a legend.
pub fn lines(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let frame = Frame {
        x: range(series.iter().flat_map(|s| s.1.iter().map(|p| p.0))),
        y: range(series.iter().flat_map(|s| s.1.iter().map(|p| p.1))),
    };
    let mut s = frame.open(title, x_label, y_label, true);
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .enumerate()
            .map(|(j, p)| {
                format!(
                    "{}{:.1} {:.1}",
                    if j == 0 { 'M' } else { 'L' },
                    frame.px(p.0),
                    frame.py(p.1)
                )
            })
            .collect();
        let _ = write!(
            s,
            r#"<path d="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
            path.join("")
        );
        for p in points.iter().filter(|p| p.0.is_finite() && p.1.is_finite()) {
            let _ = write!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                frame.px(p.0),
                frame.py(p.1)
            );
        }
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" class="lg" fill="{colour}">{}</text>"#,
            LEFT + 8.0,
            TOP + 12.0 + 13.0 * i as f64,
            escape(name)
        );
    }
    s + "</svg>"
}

/// Labelled points.
pub fn scatter(title: &str, x_label: &str, y_label: &str, points: &[(String, f64, f64)]) -> String {
    let frame = Frame {
        x: range(points.iter().map(|p| p.1)),
        y: range(points.iter().map(|p| p.2)),
    };
    let mut s = frame.open(title, x_label, y_label, true);
    for (i, (name, x, y)) in points.iter().enumerate() {
        if !(x.is_finite() && y.is_finite()) {
            continue;
        }
        let colour = COLOURS[i % COLOURS.len()];
        // Labels of points in the right half go to their left, so they stay inside the chart.
        let (px, py) = (frame.px(*x), frame.py(*y));
        let (dx, anchor) = if px > W / 2.0 {
            (-6.0, "end")
        } else {
            (6.0, "start")
        };
        let _ = write!(
            s,
            r#"<circle cx="{px:.1}" cy="{py:.1}" r="4" fill="{colour}"><title>{}</title></circle><text x="{:.1}" y="{:.1}" text-anchor="{anchor}" class="lg">{}</text>"#,
            escape(name),
            px + dx,
            py - 6.0,
            escape(name)
        );
    }
    s + "</svg>"
}

/// Vertical bars.
pub fn bars(title: &str, y_label: &str, bars: &[(String, f64)]) -> String {
    let max = bars.iter().map(|b| b.1).fold(0.0f64, f64::max).max(1e-12);
    let frame = Frame {
        x: (0.0, bars.len().max(1) as f64),
        y: (0.0, max * 1.05),
    };
    let mut s = frame.open(title, "", y_label, false);
    let width = (W - LEFT - RIGHT) / bars.len().max(1) as f64;
    // Many bars: slanted labels, so neighbours do not overlap.
    let slant = if bars.len() > 4 { -20 } else { 0 };
    for (i, (name, v)) in bars.iter().enumerate() {
        // A missing value (NaN) keeps its label and gets no bar.
        let shown = if v.is_finite() {
            short(*v)
        } else {
            "–".into()
        };
        let v = &if v.is_finite() { *v } else { 0.0 };
        let (x, y) = (frame.px(i as f64) + width * 0.1, frame.py(*v));
        let (lx, ly) = (x + width * 0.4, H - BOTTOM + 14.0);
        let _ = write!(
            s,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {}</title></rect><text transform="translate({lx:.1} {ly:.1}) rotate({slant})" text-anchor="{}" class="tk">{}</text>"#,
            width * 0.8,
            (H - BOTTOM - y).max(0.0),
            COLOURS[0],
            escape(name),
            shown,
            if slant == 0 { "middle" } else { "end" },
            escape(&name.chars().take(18).collect::<String>())
        );
    }
    s + "</svg>"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_and_escape_their_text() {
        let l = lines(
            "loss <&>",
            "step",
            "loss",
            &[("a".into(), vec![(0.0, 1.0), (1.0, 0.5), (2.0, f64::NAN)])],
        );
        assert!(l.starts_with("<svg") && l.ends_with("</svg>"));
        assert!(l.contains("loss &lt;&amp;&gt;") && !l.contains("<&>"));
        assert_eq!(l.matches("<circle").count(), 2, "NaN points are skipped");
        let b = bars(
            "counts",
            "rows",
            &[("x".into(), 3.0), ("y".into(), f64::NAN)],
        );
        assert_eq!(b.matches("<rect").count(), 2);
        assert!(!b.contains("NaN"), "{b}");
        let p = scatter("f", "L0", "FVU", &[("k=4".into(), 4.0, 0.2)]);
        assert!(p.contains("k=4"));
        assert_eq!(short(0.25), "0.25");
        assert_eq!(short(12345.0), "1.23e4");
    }
}
