//! The request lifecycle, driven natively through the host double as Envoy drives it: every
//! callback in every phase a request can be in. Each test is one path an attacker (or an
//! unlucky client) can take; none may let a request past a gate, answer it twice, or act on it
//! after `on_done`.

mod fake_envoy;
use fake_envoy::*;
use llm_ratelimit::host::dispatch::Action;
use llm_ratelimit::host::double::Process;

const T0: u64 = 1_700_000_000_000_000_000;

/// A bucket of 2 request tokens that refills one every 100 s, token limits on (bodies held).
fn tight(queue: bool) -> String {
    format!(
        r#"{{"name":"t","bucket":{{"capacity":2,"refill_rate":0.01,"burst_allowance":0}},
            "tokens":{{"capacity":1000000}},"queue":{{"enabled":{queue}}},
            "priorities":{{"NORMAL":{{"max_wait_ms":5000}}}}}}"#
    )
}

fn start(config: &str) -> (std::sync::Arc<Process>, Vm) {
    let p = Process::new(T0);
    let vm = Vm::start(&p, 7, config).expect("configured");
    (p, vm)
}

fn response_header(vm: &Vm, id: u32, name: &str) -> Option<String> {
    let s = vm.host.state();
    s.streams[&id].response_headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

fn assert_clean(vm: &Vm) {
    assert_eq!(vm.violations(), vec![], "lifecycle violations");
}

#[test]
fn request_trailers_do_not_resume_a_request_held_for_its_body() {
    let (_p, mut vm) = start(&tight(false));
    for id in 10..20 {
        assert_eq!(vm.request_headers(id, &chat_headers(&[]), false), Action::Pause, "held for its body");
        // HTTP/2: DATA without END_STREAM, then a trailers frame.
        vm.request_body(id, CHAT_BODY, false);
        vm.request_trailers(id);
    }
    assert_eq!(vm.upstream(), 2, "a bucket of 2 lets 2 through: {:?}", vm.lives);
    let answered = vm.lives.values().filter(|l| l.replies == vec![429]).count();
    assert_eq!(answered, 8, "the rest are refused: {:?}", vm.lives);
    for id in 10..20 {
        vm.done(id);
    }
    assert_clean(&vm);
}

#[test]
fn request_trailers_do_not_release_a_queued_request() {
    let (p, mut vm) = start(&tight(true));
    for id in 10..16 {
        vm.request_headers(id, &chat_headers(&[]), false);
        vm.request_body(id, CHAT_BODY, false);
        assert_eq!(vm.request_trailers(id), if id < 12 { Action::Continue } else { Action::Pause });
    }
    assert_eq!(vm.upstream(), 2);
    // More body or trailers while queued never release it either.
    for id in 12..16 {
        assert_eq!(vm.request_body(id, CHAT_BODY, true), Action::Pause);
        assert_eq!(vm.request_trailers(id), Action::Pause);
    }
    assert_eq!(vm.upstream(), 2);
    // Waiting past max_wait_ms: each is answered once, none goes upstream.
    p.advance_ms(6_000);
    vm.tick();
    assert_eq!(vm.upstream(), 2, "{:?}", vm.lives);
    assert!(vm.lives.iter().filter(|(id, _)| **id >= 12).all(|(_, l)| l.replies == vec![429]), "{:?}", vm.lives);
    for id in 10..16 {
        vm.done(id);
    }
    assert_clean(&vm);
}

fn request_header(vm: &Vm, id: u32, name: &str) -> Option<String> {
    let s = vm.host.state();
    s.streams[&id].request_headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
}

/// Request `id` went upstream once, routed to failover target `target`, with no local reply.
fn assert_failed_over(vm: &Vm, id: u32, target: &str) {
    assert_eq!(vm.lives[&id].upstream, 1, "#{id}: {:?}", vm.lives);
    assert!(vm.lives[&id].replies.is_empty(), "#{id}: {:?}", vm.lives);
    assert_eq!(request_header(vm, id, "x-llm-ratelimit-target").as_deref(), Some(target), "#{id}");
}

/// A request that waited in the queue past its class's `max_wait_ms` (more important ones took
/// the tokens it was promised) goes to a failover target that takes its class: resumed, routed
/// there, counted once, never answered with a 429. At arrival it queued, so the primary held
/// nothing against it.
#[test]
fn a_queued_request_whose_wait_runs_out_fails_over_instead_of_a_429() {
    let config = r#"{"name":"p","bucket":{"capacity":1,"refill_rate":1,"burst_allowance":0},
        "priorities":{"NORMAL":{"max_wait_ms":1500}},"queue":{"tick_ms":10},
        "classify":{"trust_header":true},"failover":[{"provider":{"name":"fb"},"classes":["NORMAL"]}]}"#;
    let (p, mut vm) = start(config);
    assert_eq!(vm.request_headers(1, &chat_headers(&[]), true), Action::Continue);
    // One token a second: NORMAL #2 may wait 1.5 s, so it queues; then two CRITICAL go first.
    assert_eq!(vm.request_headers(2, &chat_headers(&[]), true), Action::Pause);
    for id in [3, 4] {
        assert_eq!(vm.request_headers(id, &chat_headers(&[("x-llm-priority", "CRITICAL")]), true), Action::Pause);
    }
    for _ in 0..16 {
        p.advance_ms(100);
        vm.tick();
    }
    assert_eq!(vm.lives[&3].upstream, 1, "{:?}", vm.lives);
    // The NORMAL waiter is resumed, to the target.
    assert_failed_over(&vm, 2, "fb");
    assert_eq!(request_header(&vm, 3, "x-llm-ratelimit-target"), None);
    for id in 1..=4 {
        vm.done(id);
    }
    vm.tick();
    assert_eq!(vm.stat("p", "priority.normal.failover"), 1);
    assert_eq!(vm.stat("p", "failover.fb.sent"), 1);
    assert_eq!(vm.stat("p", "priority.normal.expired"), 0);
    assert_clean(&vm);
}

/// The rate limit service's first word on a request is over limit: it goes to the failover
/// target that takes its class instead of a 429.
#[test]
fn a_request_the_rate_limit_service_refuses_fails_over_instead_of_a_429() {
    // No queue: over limit, it may not wait for the service's next window.
    let config = r#"{"name":"g","global":{"cluster":"rls","timeout_ms":300},"queue":{"enabled":false},
        "failover":[{"provider":{"name":"fb"},"classes":["NORMAL"]}]}"#;
    let (_p, mut vm) = start(config);
    assert_eq!(vm.request_headers(1, &chat_headers(&[]), true), Action::Pause, "waits for the service");
    let (root, token) = vm.grpc_calls.remove(0);
    vm.grpc_answer(root, token, vec![0x08, 0x02]); // OVER_LIMIT
    assert_failed_over(&vm, 1, "fb");
    vm.done(1);
    vm.tick();
    assert_eq!(vm.stat("g", "priority.normal.failover"), 1);
    assert_eq!(vm.stat("g", "global.rejected"), 1);
    assert_eq!(vm.stat("g", "priority.normal.rejected"), 0);
    assert_clean(&vm);
}

/// A failover target's own quota windows are taken as the primary's are: one request a day
/// there, so the second that would fail over stays with the primary (refused, no queue).
#[test]
fn a_failover_target_s_quota_holds_what_it_is_sent() {
    let config = r#"{"name":"q","bucket":{"capacity":1,"refill_rate":0.001,"burst_allowance":0},
        "queue":{"enabled":false},"failover":[{"provider":{"name":"fb",
        "quotas":[{"unit":"requests","per":"day","limit":1}]},"classes":["NORMAL"]}]}"#;
    let (_p, mut vm) = start(config);
    for id in 1..=3 {
        vm.request_headers(id, &chat_headers(&[]), true);
    }
    assert_eq!(vm.upstream(), 2, "the primary's token, then the target's one request: {:?}", vm.lives);
    assert_failed_over(&vm, 2, "fb");
    assert_eq!(vm.lives[&3].replies, vec![429], "{:?}", vm.lives);
    for id in 1..=3 {
        vm.done(id);
    }
    vm.tick();
    assert_eq!(vm.stat("q", "failover.fb.sent"), 1);
    assert_eq!(vm.stat("q", "failover.fb.refused"), 1);
    assert_eq!(vm.stat("q", "priority.normal.rejected"), 1);
    assert_clean(&vm);
}

/// A target prices a request by its own table, for the model it is sent as: one whose table
/// has no price for it (and no default) does not take it; one whose budget is spent neither.
#[test]
fn a_failover_target_prices_by_its_own_table_and_keeps_its_budget() {
    let target = |prices: &str| {
        format!(
            r#"{{"name":"m","bucket":{{"capacity":1,"refill_rate":0.001,"burst_allowance":0}},
            "tokens":{{"capacity":1000000}},"queue":{{"enabled":false}},
            "failover":[{{"provider":{{"name":"fb","tokens":{{"capacity":1000000}},"prices":{prices},
            "quotas":[{{"unit":"usd","per":"day","limit":0.0001}}]}},"classes":["NORMAL"],
            "models":{{"gpt-4o-mini":"fb-mini"}}}}]}}"#
        )
    };
    // Priced only for another model: the target never takes it.
    let (_p, mut vm) = start(&target(r#"{"models":{"other":{"input":1,"output":1}}}"#));
    for id in 1..=2 {
        vm.request_headers(id, &chat_headers(&[]), false);
        vm.request_body(id, CHAT_BODY, true);
    }
    assert_eq!(vm.lives[&2].replies, vec![429], "{:?}", vm.lives);
    for id in 1..=2 {
        vm.done(id);
    }
    vm.tick();
    assert_eq!(vm.stat("m", "failover.fb.refused"), 1);
    assert_clean(&vm);

    // Priced for the name it is sent as: a budget of $0.0001 passes while unspent, so it takes
    // the first (whose estimate costs more than the budget), not the second.
    let (_p, mut vm) = start(&target(r#"{"models":{"fb-mini":{"input":10,"output":10}}}"#));
    for id in 1..=3 {
        vm.request_headers(id, &chat_headers(&[]), false);
        vm.request_body(id, CHAT_BODY, true);
    }
    assert_failed_over(&vm, 2, "fb");
    assert_eq!(vm.lives[&3].replies, vec![429], "{:?}", vm.lives);
    for id in 1..=3 {
        vm.done(id);
    }
    vm.tick();
    assert_eq!(vm.stat("m", "failover.fb.sent"), 1);
    assert_eq!(vm.stat("m", "failover.fb.refused"), 1);
    assert_clean(&vm);
}

#[test]
fn a_queued_request_is_released_once_by_the_tick_and_never_after_its_client_left() {
    let config = r#"{"name":"q","bucket":{"capacity":1,"refill_rate":10,"burst_allowance":0},"queue":{"tick_ms":10}}"#;
    let (p, mut vm) = start(config);
    assert_eq!(vm.request_headers(1, &chat_headers(&[]), true), Action::Continue);
    assert_eq!(vm.request_headers(2, &chat_headers(&[]), true), Action::Pause);
    assert_eq!(vm.request_headers(3, &chat_headers(&[]), true), Action::Pause);
    // Request 2's client goes away while it waits.
    vm.done(2);
    p.advance_ms(120);
    vm.tick();
    assert_eq!(vm.lives[&3].upstream, 1, "the next waiter is released: {:?}", vm.lives);
    assert_eq!(vm.lives[&2].upstream, 0, "a waiter that left is never released");
    p.advance_ms(500);
    vm.tick();
    for id in [1, 3] {
        vm.done(id);
    }
    assert_eq!(vm.stat("q", "priority.normal.cancelled"), 1);
    assert_clean(&vm);
}

#[test]
fn envoy_answering_a_queued_request_takes_it_out_of_the_queue() {
    let config = r#"{"name":"e","bucket":{"capacity":1,"refill_rate":10,"burst_allowance":0}}"#;
    let (p, mut vm) = start(config);
    vm.request_headers(1, &chat_headers(&[]), true);
    assert_eq!(vm.request_headers(2, &chat_headers(&[]), true), Action::Pause);
    // Envoy answers it itself (a 413, a stream timeout): its response passes the filter.
    vm.response_headers(2, &[(":status", "413")], b"", true);
    p.advance_ms(500);
    vm.tick();
    assert_eq!(vm.lives[&2].upstream, 0, "not resumed after Envoy answered it");
    vm.done(2);
    vm.done(1);
    vm.tick();
    assert_eq!(vm.stat("e", "priority.normal.cancelled"), 1, "counted once, as cancelled");
    assert_eq!(vm.stat("e", "priority.normal.admitted"), 1);
    assert_clean(&vm);
}

#[test]
fn a_held_provider_429_waits_for_its_body_and_trailers_do_not_let_it_go_early() {
    let (_p, mut vm) = start(r#"{"name":"h"}"#);
    vm.request_headers(1, &chat_headers(&[]), true);
    let body = br#"{"error":{"type":"rate_limit_error"}}"#;
    let headers = [(":status", "429"), ("content-type", "application/json"), ("retry-after", "7")];
    assert_eq!(vm.response_headers(1, &headers, body, false), Action::Pause);
    assert_eq!(vm.response_body(1, 10, false), Action::Pause, "held until the body is whole");
    // The response ends with trailers: read with what it has, then let go once.
    assert_eq!(vm.response_trailers(1), Action::Continue);
    let told = response_header(&vm, 1, "retry-after");
    assert_eq!(told.as_deref(), Some("7"), "the client is told the provider's wait");
    assert_eq!(response_header(&vm, 1, "x-llm-ratelimit-source").as_deref(), Some("provider"));
    vm.done(1);
    assert_clean(&vm);
}

#[test]
fn a_held_429_whose_body_never_comes_is_let_go_by_the_tick() {
    let (p, mut vm) = start(r#"{"name":"h2"}"#);
    vm.request_headers(1, &chat_headers(&[]), true);
    let headers = [(":status", "429"), ("content-type", "application/json")];
    assert_eq!(vm.response_headers(1, &headers, b"", false), Action::Pause);
    p.advance_ms(3_000);
    vm.tick();
    assert!(!vm.lives[&1].response_held, "let go: {:?}", vm.lives[&1]);
    // Its body then flows past, read but not held.
    assert_eq!(vm.response_body(1, 0, true), Action::Continue);
    vm.done(1);
    assert_clean(&vm);
}

#[test]
fn a_forged_probe_header_is_removed_before_the_request_goes_on() {
    let (_p, mut vm) = start(r#"{"name":"f","role":"admission"}"#);
    vm.request_headers(1, &chat_headers(&[("x-llm-ratelimit-probe", "0")]), true);
    let headers = vm.host.state().streams[&1].request_headers.clone();
    assert!(headers.iter().all(|(k, _)| k != "x-llm-ratelimit-probe"), "forged probe header kept: {headers:?}");
    vm.done(1);
    assert_clean(&vm);
}

#[test]
fn a_slow_client_is_never_let_through_unlimited_and_does_not_turn_body_reading_off() {
    let (p, mut vm) = start(&tight(false));
    // Bodies are known to come: one request delivered its body while held.
    vm.request_headers(1, &chat_headers(&[]), false);
    vm.request_body(1, CHAT_BODY, true);
    assert_eq!(vm.lives[&1].upstream, 1);
    // A client that sends headers and then nothing: held until its class's max_wait_ms, then 408.
    assert_eq!(vm.request_headers(2, &chat_headers(&[]), false), Action::Pause);
    // Its wait counts from the first tick after its headers (a hold reads no clock).
    vm.tick();
    p.advance_ms(2_000);
    vm.tick();
    assert_eq!(vm.lives[&2].upstream, 0, "not let through after a second");
    p.advance_ms(4_000);
    vm.tick();
    assert_eq!(vm.lives[&2].replies, vec![408], "{:?}", vm.lives[&2]);
    // Body reading is still on: the next request is held for its body again.
    assert_eq!(vm.request_headers(3, &chat_headers(&[]), false), Action::Pause);
    vm.request_body(3, CHAT_BODY, true);
    for id in 1..=3 {
        vm.done(id);
    }
    assert_clean(&vm);
}

#[test]
fn while_body_delivery_is_unknown_a_bodiless_hold_is_decided_from_its_size_not_let_through() {
    let (p, mut vm) = start(&tight(false));
    // Two requests spend the bucket before any body was ever seen on this worker.
    for id in 1..=2 {
        vm.request_headers(id, &chat_headers(&[("content-length", "100")]), true);
    }
    assert_eq!(vm.upstream(), 2);
    assert_eq!(vm.request_headers(3, &chat_headers(&[("content-length", "100")]), false), Action::Pause);
    vm.tick();
    p.advance_ms(1_500);
    vm.tick();
    assert_eq!(vm.lives[&3].upstream, 0, "decided by the limit, not let through: {:?}", vm.lives[&3]);
    assert_eq!(vm.lives[&3].replies, vec![429]);
    for id in 1..=3 {
        vm.done(id);
    }
    assert_clean(&vm);
}

#[test]
fn a_client_that_leaves_in_any_phase_frees_what_it_held() {
    let config =
        r#"{"name":"c","bucket":{"capacity":1,"refill_rate":10,"burst_allowance":0},"tokens":{"capacity":1000000}}"#;
    let (p, mut vm) = start(config);
    vm.request_headers(1, &chat_headers(&[]), false); // reading its body
    vm.request_headers(2, &chat_headers(&[]), true); // upstream (takes the token)
    vm.request_headers(3, &chat_headers(&[]), true); // queued
    for id in [1, 3] {
        vm.done(id);
    }
    p.advance_ms(1_000);
    vm.tick();
    vm.tick();
    assert_eq!(vm.lives[&1].upstream + vm.lives[&3].upstream, 0, "{:?}", vm.lives);
    vm.response_headers(2, &[(":status", "200")], b"{}", true);
    vm.done(2);
    // Nothing waits: the gauges read 0 and a new request gets the refilled token at once.
    assert_eq!(vm.request_headers(4, &chat_headers(&[]), true), Action::Continue);
    vm.done(4);
    assert_clean(&vm);
}

#[test]
fn a_router_retry_held_by_the_observer_is_not_let_go_by_its_body_or_trailers() {
    let (p, mut vm) = start(r#"{"name":"o","role":"observer"}"#);
    // The provider says: exhausted for 30 s.
    vm.request_headers(1, &[(":path", "/v1/chat/completions"), ("x-envoy-attempt-count", "1")], true);
    let exhausted = [(":status", "429"), ("retry-after", "30"), ("x-ratelimit-remaining-requests", "0")];
    vm.response_headers(1, &exhausted, b"", true);
    vm.done(1);
    // A retry arrives and is held (or answered) here.
    let retry = [(":path", "/v1/chat/completions"), ("x-envoy-attempt-count", "2")];
    let a = vm.request_headers(2, &retry, false);
    if a == Action::Pause && !vm.lives[&2].answered() {
        assert_eq!(vm.request_body(2, CHAT_BODY, false), Action::Pause);
        assert_eq!(vm.request_trailers(2), Action::Pause);
        assert_eq!(vm.lives[&2].upstream, 0);
    }
    p.advance_ms(31_000);
    vm.tick();
    vm.done(2);
    assert_clean(&vm);
}

#[test]
fn a_host_that_fails_every_stream_call_never_strands_or_doubles_a_request() {
    let (p, mut vm) = start(&tight(true));
    for id in 1..=4 {
        vm.request_headers(id, &chat_headers(&[]), false);
        vm.request_body(id, CHAT_BODY, true);
    }
    vm.host.fail("send_response", true);
    vm.host.fail("resume", true);
    p.advance_ms(6_000);
    vm.tick();
    vm.host.fail("send_response", false);
    vm.host.fail("resume", false);
    for id in 1..=4 {
        vm.done(id);
    }
    assert_clean(&vm);
}
