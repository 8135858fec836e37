//! `queue`: whether and how requests without a token wait.

use super::Section;

#[derive(Clone, Debug, PartialEq)]
pub struct QueueConfig {
    /// Whether requests without a token wait (true) or are rejected at once (false).
    pub enabled: bool,
    /// How often each worker releases waiting requests.
    pub tick_ms: u64,
    /// Most requests waiting at once over all classes, process-wide; when full, a more important
    /// arrival sheds the newest waiter of the least important class.
    pub max_waiting: u64,
}

pub(super) fn read(s: &mut Section) -> QueueConfig {
    QueueConfig {
        enabled: s.flag("enabled", true),
        tick_ms: s.whole("tick_ms", 10, 1),
        max_waiting: s.whole("max_waiting", 5000, 0),
    }
}
