//! Loss curves: the progress lines of a run (`step N/T epoch E  loss L (ita a itm b mlm c) ...`,
//! the task's own losses in the parentheses) parsed back and drawn as a PNG, each loss and the
//! total per step (faint) with a moving
//! average on top, on a logarithmic loss axis (ITM sits near 0.6 while the total starts above 10);
//! below it, when the run evaluated (`eval  N  txt_r1 a img_r1 b r_mean c ...` lines), a second
//! panel with the retrieval recalls over the same steps.
//! Drawn with the `image` crate and a built-in 5x7 bitmap font: no plotting library, no font
//! files.

use anyhow::{Context, Result, ensure};
use image::{Rgb, RgbImage};
use std::collections::BTreeMap;
use std::path::Path;

/// One step's losses: the total and the task's terms by name.
#[derive(Clone, Debug, PartialEq)]
pub struct StepLosses {
    pub total: f64,
    pub terms: Vec<(String, f64)>,
}

impl StepLosses {
    /// The series `name` ("total" or a term); NaN where the step has none.
    fn get(&self, name: &str) -> f64 {
        match name {
            "total" => self.total,
            _ => self.terms.iter().find(|(n, _)| n == name).map_or(f64::NAN, |(_, v)| *v),
        }
    }
}

/// A log line `KIND STEP[/TOTAL] name value name value ...` (parentheses around words ignored):
/// its step and a lookup of the value after a name; None for a line of another kind.
fn named_values(line: &str, kind: &str) -> Option<(u64, impl Fn(&str) -> Option<f64>)> {
    let mut words = line.split_whitespace();
    if words.next()? != kind {
        return None;
    }
    let step = words.next()?.split('/').next()?.parse().ok()?;
    let rest: Vec<&str> = words.map(|w| w.trim_matches(|c| c == '(' || c == ')')).collect();
    let value = move |name: &str| -> Option<f64> {
        let i = rest.iter().position(|w| *w == name)?;
        rest.get(i + 1)?.parse().ok()
    };
    Some((step, value))
}

/// Parses one progress line; None for any other line.
pub fn parse_progress_line(line: &str) -> Option<(u64, StepLosses)> {
    let (step, value) = named_values(line, "step")?;
    let total = value("loss")?;
    let inside = line.split_once(" (")?.1.split_once(')')?.0;
    let words: Vec<&str> = inside.split_whitespace().collect();
    let terms = words.chunks(2).map(|p| Some((p[0].to_string(), p.get(1)?.parse().ok()?))).collect::<Option<_>>()?;
    Some((step, StepLosses { total, terms }))
}

/// Every step's losses in `text`; a step logged twice (a resumed generation) keeps its last line.
pub fn parse_progress(text: &str) -> BTreeMap<u64, StepLosses> {
    text.lines().filter_map(parse_progress_line).collect()
}

/// One in-job retrieval evaluation (percent, ITM re-ranked).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalPoint {
    pub txt_r1: f64,
    pub img_r1: f64,
    pub r_mean: f64,
}

/// Parses an evaluation line (`eval  500  txt_r1 40.5 img_r1 38.5 r_mean 75.7 (...)`).
pub fn parse_eval_line(line: &str) -> Option<(u64, EvalPoint)> {
    let (step, value) = named_values(line, "eval")?;
    Some((step, EvalPoint { txt_r1: value("txt_r1")?, img_r1: value("img_r1")?, r_mean: value("r_mean")? }))
}

const WIDTH: u32 = 960;
const HEIGHT: u32 = 540;
/// The evaluation panel below the losses.
const EVAL_HEIGHT: u32 = 300;
const LEFT: i64 = 70;
const RIGHT: i64 = 20;
const TOP: i64 = 40;
const BOTTOM: i64 = 50;
const SCALE: i64 = 2;

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([40, 40, 40]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
/// Colours of the series ALBEF's tasks name, total first; other terms take [`OTHER_COLOURS`].
const SERIES: [(&str, Rgb<u8>); 4] = [
    ("total", Rgb([30, 30, 30])),
    ("ita", Rgb([31, 119, 180])),
    ("itm", Rgb([214, 39, 40])),
    ("mlm", Rgb([44, 160, 44])),
];
const OTHER_COLOURS: [Rgb<u8>; 3] = [Rgb([148, 103, 189]), Rgb([255, 127, 14]), Rgb([23, 190, 207])];

/// (name, colour) of each series of `steps`: the total, then the terms of its first step.
fn series_of(steps: &BTreeMap<u64, StepLosses>) -> Vec<(&str, Rgb<u8>)> {
    let terms = steps.values().next().map(|l| l.terms.as_slice()).unwrap_or_default();
    let mut others = OTHER_COLOURS.iter().cycle();
    std::iter::once("total")
        .chain(terms.iter().map(|(n, _)| n.as_str()))
        .map(|name| match SERIES.iter().find(|(n, _)| *n == name) {
            Some((_, colour)) => (name, *colour),
            None => (name, *others.next().expect("a cycle")),
        })
        .collect()
}

/// (name, colour) of each evaluation series.
const EVAL_SERIES: [(&str, Rgb<u8>); 3] =
    [("txt_r1", Rgb([148, 103, 189])), ("img_r1", Rgb([255, 127, 14])), ("r_mean", Rgb([23, 190, 207]))];

/// Draws the curves of `steps` (and, below them, the evaluations, if any) into a PNG at `out`.
pub fn plot_losses(
    steps: &BTreeMap<u64, StepLosses>,
    evals: &BTreeMap<u64, EvalPoint>,
    title: &str,
    out: &Path,
) -> Result<()> {
    ensure!(!steps.is_empty(), "no progress lines to plot");
    // One step axis for both panels.
    let keys = || steps.keys().chain(evals.keys()).copied();
    let (x0, x1) = (keys().min().unwrap_or(0) as f64, keys().max().unwrap_or(0) as f64);
    let x_range = (x0, if x1 > x0 { x1 } else { x0 + 1.0 });
    let losses = render(steps, title, x_range);
    let img = if evals.is_empty() {
        losses
    } else {
        let mut both = RgbImage::from_pixel(WIDTH, HEIGHT + EVAL_HEIGHT, WHITE);
        image::imageops::replace(&mut both, &losses, 0, 0);
        image::imageops::replace(&mut both, &render_evals(evals, x_range), 0, i64::from(HEIGHT));
        both
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    img.save(out).with_context(|| format!("writing {}", out.display()))
}

/// Reads a progress log and plots it; returns the number of steps plotted.
pub fn plot_file(progress: &Path, title: &str, out: &Path) -> Result<usize> {
    let text = std::fs::read_to_string(progress).with_context(|| format!("reading {}", progress.display()))?;
    let steps = parse_progress(&text);
    let evals: BTreeMap<u64, EvalPoint> = text.lines().filter_map(parse_eval_line).collect();
    plot_losses(&steps, &evals, title, out)?;
    Ok(steps.len())
}

/// The step axis: grid lines and labels every 1-2-5 steps across `[x0, x1]`.
fn step_axis(img: &mut RgbImage, (x0, x1): (f64, f64), px: impl Fn(f64) -> i64, top: i64, bottom: i64) {
    let xs = nice_step(x1 - x0, 8.0).max(1.0);
    let mut x = (x0 / xs).ceil() * xs;
    while x <= x1 {
        let xx = px(x);
        line(img, xx, top, xx, bottom, GRID);
        let label = format!("{x:.0}");
        text(img, xx - text_width(&label) / 2, bottom + 8, &label, INK);
        x += xs;
    }
}

/// Draws the legend of `series`, right-aligned at `right`, at height `y`.
fn legend(img: &mut RgbImage, series: &[(&str, Rgb<u8>)], right: i64, y: i64) {
    let mut lx = right;
    for (name, colour) in series.iter().rev() {
        lx -= text_width(name) + 34;
        for t in 0..3 {
            line(img, lx, y + t, lx + 20, y + t, *colour);
        }
        text(img, lx + 26, y - 6, name, INK);
    }
}

/// The evaluation panel: recalls in percent (0-100, linear) over the steps, a dot per evaluation.
fn render_evals(evals: &BTreeMap<u64, EvalPoint>, x_range: (f64, f64)) -> RgbImage {
    let mut img = RgbImage::from_pixel(WIDTH, EVAL_HEIGHT, WHITE);
    let (top, ph, pw) = (30, EVAL_HEIGHT as i64 - 30 - BOTTOM, WIDTH as i64 - LEFT - RIGHT);
    let (x0, x1) = x_range;
    let px = |x: f64| LEFT + ((x - x0) / (x1 - x0) * pw as f64).round() as i64;
    let py = |y: f64| top + ph - (y.clamp(0.0, 100.0) / 100.0 * ph as f64).round() as i64;
    for y in [0.0, 25.0, 50.0, 75.0, 100.0] {
        line(&mut img, LEFT, py(y), LEFT + pw, py(y), GRID);
        let label = format!("{y:.0}");
        text(&mut img, LEFT - 8 - text_width(&label), py(y) - 3 * SCALE, &label, INK);
    }
    step_axis(&mut img, x_range, px, top, top + ph);
    line(&mut img, LEFT, top, LEFT, top + ph, INK);
    line(&mut img, LEFT, top + ph, LEFT + pw, top + ph, INK);
    text(&mut img, LEFT, 8, "retrieval recall, percent (itm re-ranked)", INK);
    for (i, (_, colour)) in EVAL_SERIES.iter().enumerate() {
        let value = |e: &EvalPoint| [e.txt_r1, e.img_r1, e.r_mean][i];
        let points: Vec<(i64, i64)> = evals.iter().map(|(s, e)| (px(*s as f64), py(value(e)))).collect();
        polyline(&mut img, points.iter().copied(), *colour, 2);
        for (x, y) in points {
            for d in -3..=3 {
                line(&mut img, x - 3, y + d, x + 3, y + d, *colour);
            }
        }
    }
    legend(&mut img, &EVAL_SERIES, LEFT + pw - 4, top + 12);
    img
}

/// A step of 1, 2 or 5 times a power of ten giving about `n` intervals over `span`.
fn nice_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(1e-12);
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * p).find(|s| *s >= raw).unwrap_or(10.0 * p)
}

fn render(steps: &BTreeMap<u64, StepLosses>, title: &str, x_range: (f64, f64)) -> RgbImage {
    let mut img = RgbImage::from_pixel(WIDTH, HEIGHT, WHITE);
    let (x0, x1) = x_range;
    let series = series_of(steps);
    let finite: Vec<f64> = steps
        .values()
        .flat_map(|l| series.iter().map(|(name, _)| l.get(name)))
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let lo = finite.iter().copied().fold(f64::INFINITY, f64::min).clamp(1e-3, 1.0);
    let hi = finite.iter().copied().fold(0f64, f64::max).max(lo * 10.0);
    // The 1-2-5 values just outside the data.
    let ticks_of = |decade: f64| [1.0, 2.0, 5.0].map(|m| m * decade);
    let first_decade = 10f64.powf(lo.log10().floor());
    let y_lo = ticks_of(first_decade).into_iter().rfind(|t| *t <= lo * 1.0001).unwrap_or(first_decade);
    let y_hi = (0..4)
        .flat_map(|d| ticks_of(10f64.powf(hi.log10().floor() + d as f64)))
        .find(|t| *t >= hi * 0.9999)
        .unwrap_or(hi);
    let (pw, ph) = (WIDTH as i64 - LEFT - RIGHT, HEIGHT as i64 - TOP - BOTTOM);
    let px = |x: f64| LEFT + ((x - x0) / (x1 - x0) * pw as f64).round() as i64;
    let span = (y_hi / y_lo).log10();
    let py = |y: f64| {
        let f = if y > 0.0 { ((y / y_lo).log10() / span).clamp(0.0, 1.0) } else { 0.0 };
        TOP + ph - (f * ph as f64).round() as i64
    };

    // Grid and tick labels: 1, 2 and 5 of every decade.
    let mut decade = first_decade;
    while decade < y_hi * 1.001 {
        for y in ticks_of(decade) {
            if y < y_lo * 0.999 || y > y_hi * 1.001 {
                continue;
            }
            let yy = py(y);
            line(&mut img, LEFT, yy, LEFT + pw, yy, GRID);
            let label = if y < 1.0 { format!("{y}") } else { format!("{y:.0}") };
            text(&mut img, LEFT - 8 - text_width(&label), yy - 3 * SCALE, &label, INK);
        }
        decade *= 10.0;
    }
    step_axis(&mut img, x_range, px, TOP, TOP + ph);
    line(&mut img, LEFT, TOP, LEFT, TOP + ph, INK);
    line(&mut img, LEFT, TOP + ph, LEFT + pw, TOP + ph, INK);
    text(&mut img, LEFT + pw / 2 - text_width("step") / 2, HEIGHT as i64 - 20, "step", INK);
    text(&mut img, LEFT, 12, title, INK);

    // Curves: every step faint, then the moving averages on top.
    let points: Vec<(u64, &StepLosses)> = steps.iter().map(|(s, l)| (*s, l)).collect();
    let window = (points.len() / 40).max(1);
    for (name, colour) in series.iter().rev() {
        // A third of the colour on white.
        let faint = Rgb(colour.0.map(|c| ((u16::from(c) + 2 * 255) / 3) as u8));
        polyline(&mut img, points.iter().map(|(s, l)| (px(*s as f64), py(l.get(name)))), faint, 1);
    }
    for (name, colour) in series.iter().rev() {
        let smooth = points.iter().enumerate().map(|(j, (s, _))| {
            let lo = j.saturating_sub(window / 2);
            let hi = (j + window / 2 + 1).min(points.len());
            let vals: Vec<f64> = points[lo..hi].iter().map(|(_, l)| l.get(name)).filter(|v| v.is_finite()).collect();
            let mean = if vals.is_empty() { f64::NAN } else { vals.iter().sum::<f64>() / vals.len() as f64 };
            (px(*s as f64), py(mean))
        });
        polyline(&mut img, smooth, *colour, 2);
    }

    legend(&mut img, &series, LEFT + pw - 4, TOP + 12);
    img
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// Bresenham.
fn line(img: &mut RgbImage, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb<u8>) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        put(img, x, y, c);
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// Joins points (skipping breaks where a value was not finite), `thickness` pixels wide.
fn polyline(img: &mut RgbImage, points: impl Iterator<Item = (i64, i64)>, c: Rgb<u8>, thickness: i64) {
    let mut last: Option<(i64, i64)> = None;
    for p in points {
        if let Some(q) = last {
            for t in 0..thickness {
                line(img, q.0, q.1 + t, p.0, p.1 + t, c);
            }
        }
        last = Some(p);
    }
}

fn text_width(s: &str) -> i64 {
    s.chars().count() as i64 * 6 * SCALE
}

/// Draws `s` with its top-left corner at (x, y), 5x7 glyphs scaled by SCALE; unknown characters
/// are left blank.
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: Rgb<u8>) {
    for (i, ch) in s.chars().enumerate() {
        let Some(rows) = glyph(ch.to_ascii_lowercase()) else { continue };
        for (r, bits) in rows.iter().enumerate() {
            for (col, b) in bits.bytes().enumerate() {
                if b == b'#' {
                    for dy in 0..SCALE {
                        for dx in 0..SCALE {
                            put(img, x + (i as i64 * 6 + col as i64) * SCALE + dx, y + r as i64 * SCALE + dy, c);
                        }
                    }
                }
            }
        }
    }
}

#[rustfmt::skip]
fn glyph(c: char) -> Option<[&'static str; 7]> {
    Some(match c {
        '0' => [" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "],
        '1' => ["  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "],
        '2' => [" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"],
        '3' => ["#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "],
        '4' => ["   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "],
        '5' => ["#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "],
        '6' => ["  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "],
        '7' => ["#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "],
        '8' => [" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "],
        '9' => [" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "],
        '.' => ["     ", "     ", "     ", "     ", "     ", " ##  ", " ##  "],
        ',' => ["     ", "     ", "     ", "     ", " ##  ", "  #  ", " #   "],
        ':' => ["     ", " ##  ", " ##  ", "     ", " ##  ", " ##  ", "     "],
        '-' => ["     ", "     ", "     ", "#####", "     ", "     ", "     "],
        '+' => ["     ", "  #  ", "  #  ", "#####", "  #  ", "  #  ", "     "],
        '/' => ["     ", "    #", "   # ", "  #  ", " #   ", "#    ", "     "],
        '_' => ["     ", "     ", "     ", "     ", "     ", "     ", "#####"],
        '(' => ["   # ", "  #  ", " #   ", " #   ", " #   ", "  #  ", "   # "],
        ')' => [" #   ", "  #  ", "   # ", "   # ", "   # ", "  #  ", " #   "],
        '=' => ["     ", "     ", "#####", "     ", "#####", "     ", "     "],
        'a' => ["     ", "     ", " ### ", "    #", " ####", "#   #", " ####"],
        'b' => ["#    ", "#    ", "# ## ", "##  #", "#   #", "#   #", "#### "],
        'c' => ["     ", "     ", " ### ", "#    ", "#    ", "#   #", " ### "],
        'd' => ["    #", "    #", " ## #", "#  ##", "#   #", "#   #", " ####"],
        'e' => ["     ", "     ", " ### ", "#   #", "#####", "#    ", " ### "],
        'f' => ["  ## ", " #  #", " #   ", "###  ", " #   ", " #   ", " #   "],
        'g' => ["     ", " ####", "#   #", "#   #", " ####", "    #", " ### "],
        'h' => ["#    ", "#    ", "# ## ", "##  #", "#   #", "#   #", "#   #"],
        'i' => ["  #  ", "     ", " ##  ", "  #  ", "  #  ", "  #  ", " ### "],
        'j' => ["   # ", "     ", "  ## ", "   # ", "   # ", "#  # ", " ##  "],
        'k' => ["#    ", "#    ", "#  # ", "# #  ", "##   ", "# #  ", "#  # "],
        'l' => [" ##  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "],
        'm' => ["     ", "     ", "## # ", "# # #", "# # #", "#   #", "#   #"],
        'n' => ["     ", "     ", "# ## ", "##  #", "#   #", "#   #", "#   #"],
        'o' => ["     ", "     ", " ### ", "#   #", "#   #", "#   #", " ### "],
        'p' => ["     ", "     ", "#### ", "#   #", "#### ", "#    ", "#    "],
        'q' => ["     ", "     ", " ## #", "#  ##", " ####", "    #", "    #"],
        'r' => ["     ", "     ", "# ## ", "##  #", "#    ", "#    ", "#    "],
        's' => ["     ", "     ", " ### ", "#    ", " ### ", "    #", "#### "],
        't' => [" #   ", " #   ", "###  ", " #   ", " #   ", " #  #", "  ## "],
        'u' => ["     ", "     ", "#   #", "#   #", "#   #", "#  ##", " ## #"],
        'v' => ["     ", "     ", "#   #", "#   #", "#   #", " # # ", "  #  "],
        'w' => ["     ", "     ", "#   #", "#   #", "# # #", "# # #", " # # "],
        'x' => ["     ", "     ", "#   #", " # # ", "  #  ", " # # ", "#   #"],
        'y' => ["     ", "     ", "#   #", "#   #", " ####", "    #", " ### "],
        'z' => ["     ", "     ", "#####", "   # ", "  #  ", " #   ", "#####"],
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "step    40/300 epoch   0  loss 7.708 (ita 4.119 itm 0.639 mlm 2.949)  lr 1.00e-3 alpha 0.12 temp 0.0662  22 img/s";

    #[test]
    fn progress_lines_parse_and_others_are_ignored() {
        let (step, l) = parse_progress_line(LINE).unwrap();
        assert_eq!(step, 40);
        let terms = [("ita", 4.119), ("itm", 0.639), ("mlm", 2.949)].map(|(n, v)| (n.to_string(), v)).to_vec();
        assert_eq!(l, StepLosses { total: 7.708, terms });
        let (_, ve) =
            parse_progress_line("step 3/9 epoch 0  loss 0.750 (ve 0.750)  lr 1.00e-3 alpha 0.40  227 img/s").unwrap();
        assert_eq!(ve.terms, [("ve".to_string(), 0.75)], "a task's own losses");
        assert!(parse_progress_line("trained 300 steps in 53s").is_none());
        assert!(parse_progress_line("step x/300").is_none());
        let log = format!("{LINE}\nnoise\n{}\n", LINE.replace("7.708", "7.000"));
        let parsed = parse_progress(&log);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[&40].total, 7.0, "a repeated step keeps its last line");
    }

    #[test]
    fn a_plot_is_written_with_every_series() {
        let dir = tempfile::tempdir().unwrap();
        let steps: BTreeMap<u64, StepLosses> = (0..300)
            .map(|s| {
                let f = 1.0 + 5.0 / (1.0 + s as f64 / 30.0);
                let mlm = if s == 7 { f64::NAN } else { 1.4 * f };
                let terms = [("ita", f), ("itm", 0.6), ("mlm", mlm)].map(|(n, v)| (n.to_string(), v)).to_vec();
                (s, StepLosses { total: 3.0 * f, terms })
            })
            .collect();
        let out = dir.path().join("loss.png");
        let none = BTreeMap::new();
        plot_losses(&steps, &none, "loss per step", &out).unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        assert_eq!((img.width(), img.height()), (WIDTH, HEIGHT));
        for (name, colour) in SERIES {
            assert!(img.pixels().filter(|p| **p == colour).count() > 300, "{name} curve missing");
        }
        assert!(plot_losses(&BTreeMap::new(), &none, "empty", &out).is_err());

        // Evaluations add a panel below, each series drawn.
        let log = "eval    100  txt_r1 10.0 img_r1 8.5 r_mean 30.2 (ITM re-ranked, 200 images, 3.1s)\n\
                   eval    300  txt_r1 40.5 img_r1 38.5 r_mean 75.7 (ITM re-ranked, 200 images, 3.0s)";
        let evals: BTreeMap<u64, EvalPoint> = log.lines().filter_map(parse_eval_line).collect();
        assert_eq!(evals[&300], EvalPoint { txt_r1: 40.5, img_r1: 38.5, r_mean: 75.7 });
        plot_losses(&steps, &evals, "loss per step", &out).unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        assert_eq!((img.width(), img.height()), (WIDTH, HEIGHT + EVAL_HEIGHT));
        let panel = image::imageops::crop_imm(&img, 0, HEIGHT, WIDTH, EVAL_HEIGHT).to_image();
        for (name, colour) in EVAL_SERIES {
            assert!(panel.pixels().filter(|p| **p == colour).count() > 100, "{name} evaluations missing");
        }
    }
}
