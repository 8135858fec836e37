//! `in_flight`: how many requests may be at the provider at once, process-wide (off unless the
//! section is there), fixed or adaptive.

use super::{show, Fault, Section};
use crate::inflight::{Adaptive, Rules};

pub(super) fn read(s: &mut Section) -> Rules {
    s.require("max", "required: the most requests in flight (the ceiling, when adaptive)");
    let max_whole = s.whole_to("max", 1, 1, 1_000_000);
    let max = max_whole as f64;
    let adaptive = s.with_opt("adaptive", |a| {
        let floor_whole = a.whole_to("floor", 1, 1, 1_000_000);
        let floor = floor_whole as f64;
        let initial = a.whole_to("initial", floor_whole, 1, 1_000_000) as f64;
        let tolerance = a.positive("tolerance", 1.2);
        let backoff = a.fraction("backoff", 0.9);
        if tolerance <= 1.0 {
            a.fail(
                Fault::Value,
                "tolerance",
                format_args!("must be a number > 1 (a latency ratio), got {}", show(tolerance)),
            );
        }
        if !(0.0 < backoff && backoff < 1.0) {
            a.fail(Fault::Value, "backoff", format_args!("must be a number > 0 and < 1, got {}", show(backoff)));
        }
        if floor > max {
            a.fail(
                Fault::Value,
                "floor",
                format_args!("must be at most in_flight.max ({max_whole}), got {floor_whole}"),
            );
        }
        if initial < floor || initial > max {
            a.fail(
                Fault::Value,
                "initial",
                format_args!("must be from floor ({floor_whole}) to in_flight.max ({max_whole})"),
            );
        }
        Adaptive { floor, initial: initial.max(floor).min(max), tolerance, backoff }
    });
    Rules { max, adaptive }
}

#[cfg(test)]
mod tests {
    use crate::config::{err, Config};
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn in_flight_is_off_by_default_and_checked_field_by_field() {
        assert_eq!(Config::default().in_flight, None);
        let c = Config::parse(br#"{"in_flight":{"max":16,"adaptive":{"floor":2}}}"#).unwrap();
        let r = c.in_flight.unwrap();
        assert_eq!(r.max, 16.0);
        let a = r.adaptive.unwrap();
        assert_eq!((a.floor, a.initial, a.tolerance, a.backoff), (2.0, 2.0, 1.2, 0.9));
        assert!(err(r#"{"in_flight":{}}"#).starts_with("in_flight.max: required"));
        assert!(err(r#"{"in_flight":{"max":0}}"#).starts_with("in_flight.max: must be a whole number"));
        assert!(err(r#"{"in_flight":{"max":4,"adaptive":{"floor":5}}}"#)
            .starts_with("in_flight.adaptive.floor: must be at most"));
        assert!(err(r#"{"in_flight":{"max":4,"adaptive":{"tolerance":1}}}"#)
            .starts_with("in_flight.adaptive.tolerance: must be a number > 1"));
        assert!(err(r#"{"in_flight":{"max":4,"adaptive":{"backoff":1}}}"#)
            .starts_with("in_flight.adaptive.backoff: must be a number > 0 and < 1"));
        assert!(err(r#"{"in_flight":{"max":4,"adaptive":{"intial":1}}}"#)
            .starts_with("in_flight.adaptive.intial: unknown field"));
    }
}
