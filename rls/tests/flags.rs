//! Hostile flag and environment values: a clean exit naming the setting, never a panic.

mod common;

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use common::*;

/// Hostile values: huge, negative, NaN, empty, out of range, odd forms, not UTF-8 (a few are
/// allowed by some settings: see `allowed`).
fn hostile() -> Vec<OsString> {
    let huge = "9".repeat(400);
    let mut v: Vec<OsString> = [
        format!("{huge}ms"),
        format!("{huge}s"),
        format!("{huge}.5us"),
        huge.clone(),
        "18446744073709551616".into(),
        "18446744073709551616s".into(),
        "1e400".into(),
        "1e400ms".into(),
        "-1".into(),
        "-1ms".into(),
        "NaN".into(),
        "NaNs".into(),
        "infs".into(),
        "".into(),
        " 1".into(),
        "0x10".into(),
        "1.2.3ms".into(),
        ".s".into(),
        "0ms".into(),
        "65536".into(),
        "0".into(),
        "x".repeat(60_000),
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    v.push(OsString::from_vec(b"1\xffms".to_vec()));
    v
}

/// The binary with `base_args()` and then `--flag=value` (the last of a flag wins).
fn run(flag: &str, value: &OsString) -> Launch {
    let mut args = base_args();
    let mut arg = OsString::from(format!("--{flag}="));
    arg.push(value);
    args.push(arg);
    launch(&args, &[])
}

/// `base_args()` less `--flag VALUE`, so that its variable counts.
fn base_args_without(flag: &str) -> Vec<OsString> {
    let mut args = base_args();
    if let Some(i) = args.iter().position(|a| a.to_str() == Some(&format!("--{flag}"))) {
        args.drain(i..i + 2);
    }
    args
}

fn short(s: &str) -> String {
    s.chars().take(30).collect()
}

fn no_panic(what: &str, launch: &Launch) {
    if let Launch::Exited(code, stderr) = launch {
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        assert!(matches!(code, Some(1 | 2)), "{what}: exit {code:?}: {stderr}");
    }
}

/// Values of a numeric setting that are allowed after all.
fn allowed(flag: &str, value: &str) -> bool {
    matches!(
        (flag, value),
        ("grpc-port" | "http-port", "0") | ("max-in-flight", "65536") | ("clock-offset-s", "-1" | "0" | "65536")
    )
}

#[test]
fn hostile_flag_values_exit_2_without_panic() {
    // Numeric settings, as a flag or a variable: exit 2 naming the setting and the allowed range.
    let numeric = [
        ("redis-timeout", "REDIS_TIMEOUT", "1ms to 60s"),
        ("grpc-port", "GRPC_PORT", "0 to 65535"),
        ("http-port", "PORT", "0 to 65535"),
        ("max-in-flight", "MAX_IN_FLIGHT", "1 to 1000000"),
        ("clock-offset-s", "LLM_RLS_CLOCK_OFFSET_S", "-3153600000 to 3153600000"),
    ];
    for (flag, var, range) in numeric {
        for value in hostile() {
            let text = value.to_string_lossy();
            let shown = short(&text);
            let mut runs = vec![(format!("--{flag}"), run(flag, &value))];
            // An empty variable is an unset one.
            if !value.is_empty() {
                runs.push((var.to_string(), launch(&base_args_without(flag), &[(var, value.clone())])));
            }
            for (name, launched) in runs {
                let how = format!("{name}={shown}");
                match launched {
                    Launch::Listening(_) => assert!(allowed(flag, &text), "{how}: accepted"),
                    Launch::Exited(code, stderr) => {
                        assert!(!stderr.contains("panicked"), "{how}: {stderr}");
                        assert_eq!(code, Some(2), "{how}: {stderr}");
                        let first = stderr.lines().next().unwrap_or_default();
                        assert!(first.contains(&name), "{how}: {first}");
                        assert!(first.contains(range) || first.contains("not UTF-8"), "{how}: {first}");
                        assert!(first.len() < 200, "{how}: a message of {} bytes", first.len());
                    }
                    Launch::Hung => panic!("{how}: hung"),
                }
            }
        }
    }
    // Other settings: whatever they say, no panic.
    for flag in ["config", "redis", "redis-cluster", "grpc-host", "http-host"] {
        for value in hostile() {
            no_panic(&format!("--{flag}={}", short(&value.to_string_lossy())), &run(flag, &value));
        }
    }
    // A flag without its value, or not UTF-8 at all.
    let mut args = base_args();
    args.push("--redis-timeout".into());
    no_panic("no value", &launch(&args, &[]));
    let mut args = base_args();
    args.push(OsString::from_vec(b"--redis-timeout\xff".to_vec()));
    no_panic("non-UTF-8 flag", &launch(&args, &[]));
}
