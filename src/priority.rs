//! The four priority classes and what the operator can set per class.

/// A request's priority class, most important first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    Critical,
    High,
    Normal,
    Low,
}

impl Priority {
    /// Every class, most important first; `Priority as usize` indexes arrays in this order.
    pub const ALL: [Priority; 4] = [Priority::Critical, Priority::High, Priority::Normal, Priority::Low];

    pub fn index(self) -> usize {
        self as usize
    }

    /// Upper-case name as written in config and headers.
    pub fn name(self) -> &'static str {
        match self {
            Priority::Critical => "CRITICAL",
            Priority::High => "HIGH",
            Priority::Normal => "NORMAL",
            Priority::Low => "LOW",
        }
    }

    /// Lower-case name as used in stat names and Prometheus labels.
    pub fn stat_name(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// Parses a header value, ignoring case and surrounding blanks.
    pub fn parse(value: &str) -> Option<Priority> {
        let v = value.trim();
        Priority::ALL.into_iter().find(|p| p.name().eq_ignore_ascii_case(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn parses_names_case_insensitively() {
        assert_eq!(Priority::parse(" critical "), Some(Priority::Critical));
        assert_eq!(Priority::parse("Low"), Some(Priority::Low));
        assert_eq!(Priority::parse("urgent"), None);
        assert_eq!(Priority::parse(""), None);
    }

    #[test]
    fn order_is_most_important_first() {
        assert!(Priority::Critical < Priority::High && Priority::Normal < Priority::Low);
        assert_eq!(Priority::Low.index(), 3);
    }
}
