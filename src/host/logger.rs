//! The `log` crate's logger, writing to Envoy's log through `proxy_log`. The SDK's unwraps the
//! host call's status (a panic that kills the VM); this one drops a message the host refuses.

use super::calls::host;
use log::{Level, LevelFilter, Log, Metadata, Record};

struct Logger;

static LOGGER: Logger = Logger;

/// Installs the logger at every level (the build caps it at `info`; Envoy filters further).
pub fn init() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(LevelFilter::Trace);
    }
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // proxy-wasm's levels: trace 0 … error 4.
        let level = match record.level() {
            Level::Trace => 0,
            Level::Debug => 1,
            Level::Info => 2,
            Level::Warn => 3,
            Level::Error => 4,
        };
        let _ = match record.args().as_str() {
            Some(s) => host().log(level, s),
            None => host().log(level, &record.args().to_string()),
        };
    }

    fn flush(&self) {}
}
