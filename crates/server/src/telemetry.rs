//! Logging: JSON lines or readable text on stderr, filtered like `RUST_LOG`.
//!
//! Every line logged while a request is handled carries that request's `trace_id`, from the span
//! that `http::finish` opens.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use unhidra_config::LogFormat;

/// Installs the process's logger. Call once, before anything logs.
pub fn init(filter: &str, format: LogFormat) -> Result<(), String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| format!("log filter {filter:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    result.map_err(|e| e.to_string())
}
