//! Logging: one subscriber, text or JSON, filtered by `RUST_LOG`.
//!
//! Logs go to stderr, so stdout stays clean for command output such as
//! `check-config`. Nothing logged carries a key or a token: secrets are
//! [`crate::secret::Secret`]s and tokens appear as fingerprints.

use std::cell::RefCell;
use std::io::IsTerminal;
use std::time::UNIX_EPOCH;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::{Writer, debug_fn};
use tracing_subscriber::fmt::time::FormatTime;

use crate::clock::{SystemClock, WallClock as _};
use crate::config::LogFormat;

/// Filter used when `RUST_LOG` is unset.
pub const DEFAULT_FILTER: &str = "info";

/// The default timestamps (RFC 3339, UTC, microseconds), with the part
/// before the fraction formatted once a second rather than on every line:
/// the proxy writes a line per request.
#[derive(Debug, Clone, Copy)]
struct CachedUtc;

thread_local! {
    /// The second last formatted, and its `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl FormatTime for CachedUtc {
    fn format_time(&self, writer: &mut Writer<'_>) -> std::fmt::Result {
        let now = SystemClock
            .now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        SECOND.with(|second| {
            let mut second = second.borrow_mut();
            if second.0 != now.as_secs() {
                *second = (now.as_secs(), whole_second(now.as_secs()));
            }
            write!(writer, "{}.{:06}Z", second.1, now.subsec_micros())
        })
    }
}

/// `YYYY-MM-DDTHH:MM:SS` of a unix second.
fn whole_second(secs: u64) -> String {
    let formatted = i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        });
    match formatted {
        Some(text) => text.trim_end_matches('Z').to_string(),
        None => "1970-01-01T00:00:00".to_string(),
    }
}

/// `name=value` pairs separated by spaces, the message bare: the default
/// text format's fields, unstyled.
fn plain_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static {
    debug_fn(
        |writer: &mut Writer<'_>, field: &tracing::field::Field, value: &dyn std::fmt::Debug| {
            if field.name() == "message" {
                write!(writer, "{value:?}")
            } else {
                write!(writer, "{}={value:?}", field.name())
            }
        },
    )
    .delimited(" ")
}

/// Installs the global subscriber. Calling it twice is harmless (the
/// second call does nothing), which keeps tests simple.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        // A stderr nobody reads (a log collector gone) must not make
        // logging panic: tracing-subscriber reports a failed write with
        // eprintln!, which panics on that same broken stderr, and a panic
        // in the signal task kept SIGTERM from stopping the process.
        .log_internal_errors(false)
        .with_timer(CachedUtc)
        .with_target(false);
    let _ = match format {
        // On a terminal, the default fields (names in italics).
        LogFormat::Text if ansi => builder.try_init(),
        // Elsewhere the same text without styling: the default formatter
        // paints every field name with an empty style, which was half the
        // cost of the proxy's access line (BENCHMARKS.md, "The proxy").
        LogFormat::Text => builder.fmt_fields(plain_fields()).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_seconds_are_rfc3339_without_the_zone() {
        // (unix seconds, formatted)
        let cases = [
            (0, "1970-01-01T00:00:00"),
            (951_782_400, "2000-02-29T00:00:00"),
            (1_796_190_981, "2026-12-02T05:56:21"),
            (4_102_444_799, "2099-12-31T23:59:59"),
        ];
        for (secs, text) in cases {
            assert_eq!(whole_second(secs), text, "{secs}");
        }
    }
}
