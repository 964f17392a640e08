//! Progress reporting: indicatif bars on a terminal, throttled plain lines elsewhere (Colab cells, CI logs).

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// `text` as it may reach a terminal: control characters other than newline and tab (ESC, BEL, CR, DEL, the
/// C1 range) and the bidirectional overrides are shown as `\u{..}` escapes. Messages quote data (a label
/// from a dataset, a field of a downloaded file); printed raw, an escape sequence in it could retitle the
/// terminal, clear the screen or hide text (as "Trojan Source" does with bidi controls).
pub fn terminal_safe(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        (c.is_control() && c != '\n' && c != '\t')
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// How often a plain (non-terminal) progress line may be printed per stage.
const PLAIN_INTERVAL: Duration = Duration::from_secs(5);

/// Creates per-stage progress handles and prints run messages without tearing the bars.
#[derive(Clone)]
pub struct Reporter {
    multi: Option<MultiProgress>,
    quiet: bool,
}

impl Reporter {
    /// Bars when stderr is a terminal, plain lines otherwise.
    pub fn new(quiet: bool) -> Self {
        let multi = (!quiet && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10)));
        Self { multi, quiet }
    }

    /// Prints a line to stderr above any bars.
    pub fn println(&self, msg: &str) {
        if !self.quiet {
            self.alert(msg);
        }
    }

    /// Prints a line even in quiet mode: failures and damage found, which a user must see.
    pub fn alert(&self, msg: &str) {
        let msg = terminal_safe(msg);
        match &self.multi {
            Some(m) => {
                let _ = m.println(msg);
            }
            None => eprintln!("{msg}"),
        }
    }

    /// A progress handle for one running stage.
    pub fn stage(&self, name: &str) -> Progress {
        let bar = self.multi.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new_spinner());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {prefix:.bold} {elapsed_precise} {wide_msg}",
                )
                .expect("valid template"),
            );
            bar.set_prefix(name.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            inner: Arc::new(Inner {
                name: name.to_string(),
                bar,
                plain: (!self.quiet && self.multi.is_none()).then(|| {
                    Mutex::new(Plain {
                        start: Instant::now(),
                        last: Instant::now(),
                        total: None,
                        pos: 0,
                        msg: String::new(),
                        bytes: false,
                    })
                }),
            }),
        }
    }
}

struct Plain {
    start: Instant,
    last: Instant,
    total: Option<u64>,
    pos: u64,
    msg: String,
    /// Units are bytes: shown in MiB.
    bytes: bool,
}

struct Inner {
    name: String,
    bar: Option<ProgressBar>,
    plain: Option<Mutex<Plain>>,
}

/// A stage's progress: optional total, position, message. Cheap to clone and to call often.
#[derive(Clone)]
pub struct Progress {
    inner: Arc<Inner>,
}

impl Progress {
    /// A handle that shows nothing (tests, library use).
    pub fn hidden() -> Self {
        Self {
            inner: Arc::new(Inner {
                name: String::new(),
                bar: None,
                plain: None,
            }),
        }
    }

    /// Sets the amount of work (e.g. tokens), switching to a bar with rate and ETA.
    pub fn set_total(&self, total: u64) {
        if let Some(bar) = &self.inner.bar {
            bar.set_length(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:.bold} [{bar:30}] {human_pos}/{human_len} {per_sec} ETA {eta} {wide_msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
        }
        self.with_plain(|p| p.total = Some(total));
    }

    /// Sets the amount of work in bytes (a transfer), switching to a bar with bytes, byte rate and ETA.
    pub fn set_total_bytes(&self, total: u64) {
        if let Some(bar) = &self.inner.bar {
            bar.set_length(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:.bold} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} \
                     ETA {eta} {wide_msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
        }
        self.with_plain(|p| {
            p.total = Some(total);
            p.bytes = true;
        });
    }

    /// Advances by `n` units.
    pub fn inc(&self, n: u64) {
        if let Some(bar) = &self.inner.bar {
            bar.inc(n);
        }
        self.with_plain(|p| p.pos += n);
    }

    /// Sets the position.
    pub fn set_position(&self, pos: u64) {
        if let Some(bar) = &self.inner.bar {
            bar.set_position(pos);
        }
        self.with_plain(|p| p.pos = pos);
    }

    /// Sets the message shown after the bar.
    pub fn set_message(&self, msg: &str) {
        let msg = &*terminal_safe(msg);
        if let Some(bar) = &self.inner.bar {
            bar.set_message(msg.to_string());
        }
        self.with_plain(|p| p.msg = msg.to_string());
    }

    /// Prints a line (above the bar on a terminal); hidden handles print nothing.
    pub fn println(&self, msg: &str) {
        let msg = terminal_safe(msg);
        if let Some(bar) = &self.inner.bar {
            bar.println(format!("[{}] {msg}", self.inner.name));
        } else if self.inner.plain.is_some() {
            eprintln!("[{}] {msg}", self.inner.name);
        }
    }

    /// Lets plain mode print a heartbeat line for stages without a total.
    pub fn tick(&self) {
        self.with_plain(|_| {});
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.inner.bar {
            bar.finish_and_clear();
        }
    }

    fn with_plain(&self, f: impl FnOnce(&mut Plain)) {
        let Some(plain) = &self.inner.plain else {
            return;
        };
        let mut p = plain.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut p);
        if p.last.elapsed() < PLAIN_INTERVAL {
            return;
        }
        p.last = Instant::now();
        let secs = p.start.elapsed().as_secs_f64();
        let line = match p.total {
            Some(total) if total > 0 => {
                let rate = p.pos as f64 / secs.max(1e-9);
                let eta = if rate > 0.0 {
                    (total.saturating_sub(p.pos)) as f64 / rate
                } else {
                    f64::NAN
                };
                let percent = 100.0 * p.pos as f64 / total as f64;
                if p.bytes {
                    const MIB: f64 = (1 << 20) as f64;
                    format!(
                        "[{}] {percent:.0}% {:.1}/{:.1} MiB ({:.1} MiB/s, ETA {eta:.0}s) {}",
                        self.inner.name,
                        p.pos as f64 / MIB,
                        total as f64 / MIB,
                        rate / MIB,
                        p.msg
                    )
                } else {
                    format!(
                        "[{}] {percent:.0}% {}/{} ({rate:.1}/s, ETA {eta:.0}s) {}",
                        self.inner.name, p.pos, total, p.msg
                    )
                }
            }
            _ => format!("[{}] running for {:.0}s {}", self.inner.name, secs, p.msg),
        };
        eprintln!("{}", line.trim_end());
    }
}

#[cfg(test)]
mod tests {
    use super::terminal_safe;

    #[test]
    fn terminal_safe_escapes_control_and_bidi_characters_only() {
        assert_eq!(
            terminal_safe("label `é` at 3:\n\tok"),
            "label `é` at 3:\n\tok"
        );
        assert!(matches!(
            terminal_safe("plain"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            terminal_safe("\u{1b}]0;pwned\u{7}\u{1b}[2J\r\u{9b}x\u{202e}y\u{7f}"),
            "\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{d}\\u{9b}x\\u{202e}y\\u{7f}"
        );
    }
}
