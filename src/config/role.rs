//! `role`: where this instance of the filter sits, and so what it does.

use super::Section;

/// Where this instance of the filter sits, and so what it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// One instance, in the listener's filter chain: admission, learning and 429 rewriting.
    /// Learns only from the final response when the router retries.
    Standalone,
    /// In the listener's chain, beside an `observer`: admission and 429 rewriting.
    Admission,
    /// In the cluster's upstream filter chain: learns from every attempt the router makes.
    Observer,
}

impl Role {
    const ALL: [Role; 3] = [Role::Standalone, Role::Admission, Role::Observer];

    pub fn name(self) -> &'static str {
        match self {
            Role::Standalone => "standalone",
            Role::Admission => "admission",
            Role::Observer => "observer",
        }
    }

    pub fn admits(self) -> bool {
        self != Role::Observer
    }
    pub fn learns(self) -> bool {
        self != Role::Admission
    }
}

/// The top-level field `role`.
pub(super) fn read(top: &mut Section) -> Role {
    top.variant("role", &Role::ALL.map(Role::name), &Role::ALL).unwrap_or(Role::Standalone)
}
