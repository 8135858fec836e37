//! Which token bucket a request draws on: its model's `tokens.per_model` entry, or the
//! provider's.

use super::estimate::path_model;

/// The token bucket a request to `path` whose body names `body_model` draws on: 0 for the
/// provider's, `i + 1` for `per_model[i]`.
///
/// The model is the one the path names when it names one (Gemini / Vertex `.../models/<m>:`,
/// Azure `/openai/deployments/<d>/`, Bedrock `/model/<id>/`), else the body's: the provider
/// serves the path's (Azure ignores the body's `model`, which could name another deployment's
/// bucket). An [`Estimate::model`](super::estimate::Estimate), which falls back to the path's,
/// serves as `body_model` too.
///
/// A configured name matches a model named exactly so; else the longest configured name that
/// the model is a version of: that name, then `-` or `@`, then segments separated by `-`, `@`
/// or `:`, each all digits, `v` and digits, or `latest`, the first a date or snapshot number (3
/// digits or more), a `v` version or `latest`. So `gpt-4o` covers `gpt-4o-2024-08-06`,
/// `claude-3-5-sonnet` covers `claude-3-5-sonnet-20241022` and (on Vertex)
/// `claude-3-5-sonnet-v2@20241022`, `gemini-1.5-pro` covers `gemini-1.5-pro-002`, and
/// `anthropic.claude-3-5-sonnet` covers Bedrock's `anthropic.claude-3-5-sonnet-20240620-v1:0`.
/// A variant, a minor version or a preview is another model: `gpt-4o` does not cover
/// `gpt-4o-mini-2024-07-18` (`gpt-4o-mini` does), nor `claude-opus-4` `claude-opus-4-1`, nor
/// `gpt-4` `gpt-4-1106-preview`. Names are compared as written (case matters). A configured
/// snapshot (`gpt-4o-2024-08-06`) covers only itself.
pub fn model_bucket<T>(per_model: &[(String, T)], path: &str, body_model: Option<&str>) -> u8 {
    let Some(model) = path_model(path).or(body_model).filter(|m| !m.is_empty()) else { return 0 };
    let exact = per_model.iter().position(|(name, _)| name == model);
    let family = || {
        let versions = per_model.iter().enumerate().filter(|(_, (name, _))| is_version_of(model, name));
        versions.max_by_key(|(_, (name, _))| name.len()).map(|(i, _)| i)
    };
    // At most `MAX_MODELS` (64) entries: `i + 1` fits; anything past 255 is the provider's.
    exact.or_else(family).and_then(|i| u8::try_from(i + 1).ok()).unwrap_or(0)
}

/// Whether `model` is `family` followed by a version suffix (see [`model_bucket`]).
fn is_version_of(model: &str, family: &str) -> bool {
    let Some(version) = model.strip_prefix(family).and_then(|rest| rest.strip_prefix(['-', '@'])) else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let v = |s: &str| s.strip_prefix('v').is_some_and(digits);
    let mut segments = version.split(['-', '@', ':']);
    // A minor version (`-1`) or a two-digit part names another model; a snapshot starts longer.
    let first = segments.next().is_some_and(|s| (digits(s) && s.len() >= 3) || v(s) || s == "latest");
    first && segments.all(|s| digits(s) || v(s) || s == "latest")
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// Configured names, in name order as the configuration keeps them.
    fn configured(names: &[&str]) -> Vec<(String, ())> {
        let mut v: Vec<(String, ())> = names.iter().map(|n| (n.to_string(), ())).collect();
        v.sort();
        v
    }

    /// The configured name a request draws on, or `None` for the provider's bucket.
    fn bucket_of<'a>(per_model: &'a [(String, ())], path: &str, body: Option<&str>) -> Option<&'a str> {
        let i = model_bucket(per_model, path, body);
        let name = per_model.get(usize::from(i).checked_sub(1)?).map(|(n, _)| n.as_str());
        assert!(name.is_some(), "bucket {i} of {} models", per_model.len());
        name
    }

    const CHAT: &str = "/v1/chat/completions";

    #[test]
    fn a_model_draws_on_its_own_or_its_family_s_bucket() {
        let per_model = configured(&[
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4",
            "o1",
            "claude-3-5-sonnet",
            "claude-3-5-sonnet-v2",
            "claude-opus-4",
            "gemini-1.5-pro",
            "gemini-1.5-flash",
            "gpt-4o-prod",
            "anthropic.claude-3-5-sonnet",
            "mistral-large",
        ]);
        for (path, body, bucket) in [
            // Exact.
            (CHAT, Some("gpt-4o"), Some("gpt-4o")),
            (CHAT, Some("gpt-4o-mini"), Some("gpt-4o-mini")),
            // Dated snapshots and revisions of a family.
            (CHAT, Some("gpt-4o-2024-08-06"), Some("gpt-4o")),
            (CHAT, Some("gpt-4o-mini-2024-07-18"), Some("gpt-4o-mini")),
            (CHAT, Some("gpt-4-0613"), Some("gpt-4")),
            (CHAT, Some("o1-2024-12-17"), Some("o1")),
            ("/v1/messages", Some("claude-3-5-sonnet-20241022"), Some("claude-3-5-sonnet")),
            ("/v1/messages", Some("claude-3-5-sonnet-latest"), Some("claude-3-5-sonnet")),
            ("/v1/chat/completions", Some("mistral-large-2407"), Some("mistral-large")),
            // Another model, not a version: a variant, a minor version, a preview.
            (CHAT, Some("gpt-4o-mini-tts"), None),
            (CHAT, Some("gpt-4o-realtime-preview-2024-10-01"), None),
            (CHAT, Some("gpt-4-turbo-2024-04-09"), None),
            (CHAT, Some("gpt-4-32k"), None),
            (CHAT, Some("gpt-4-1106-preview"), None),
            (CHAT, Some("o1-mini"), None),
            ("/v1/messages", Some("claude-opus-4-1-20250805"), None),
            ("/v1/messages", Some("claude-3-5-haiku-20241022"), None),
            (CHAT, Some("gpt-4o-"), None),
            (CHAT, Some("gpt-4o--2024"), None),
            (CHAT, Some("gpt-4o2024-08-06"), None),
            (CHAT, Some("GPT-4o"), None),
            (CHAT, Some(""), None),
            (CHAT, None, None),
            // Gemini and Vertex: the path names the model, whatever the body says.
            ("/v1beta/models/gemini-1.5-pro:generateContent", None, Some("gemini-1.5-pro")),
            ("/v1beta/models/gemini-1.5-pro-002:streamGenerateContent?alt=sse", None, Some("gemini-1.5-pro")),
            ("/v1beta/models/gemini-1.5-flash-8b:generateContent", None, None),
            ("/v1beta/models/gemini-1.5-pro:generateContent", Some("gpt-4o"), Some("gemini-1.5-pro")),
            (
                "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-3-5-sonnet-v2@20241022:rawPredict",
                None,
                Some("claude-3-5-sonnet-v2"),
            ),
            (
                "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-3-5-sonnet@20240620:rawPredict",
                None,
                Some("claude-3-5-sonnet"),
            ),
            // Azure: the deployment decides, never the body's model (which Azure ignores).
            ("/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21", Some("gpt-4o"), Some("gpt-4o-prod")),
            ("/openai/deployments/gpt-4o-2024-08-06/chat/completions", Some("gpt-4o-mini"), Some("gpt-4o")),
            ("/openai/deployments/staging/chat/completions", Some("gpt-4o"), None),
            // Azure's v1 API names the deployment in the body.
            ("/openai/v1/chat/completions", Some("gpt-4o-prod"), Some("gpt-4o-prod")),
            // Bedrock: the model id in the path, with its `-v1:0` revision.
            ("/model/anthropic.claude-3-5-sonnet-20240620-v1:0/invoke", None, Some("anthropic.claude-3-5-sonnet")),
            ("/model/anthropic.claude-3-5-sonnet-20240620-v1:0/converse-stream", Some("x"), Some("anthropic.claude-3-5-sonnet")),
        ] {
            assert_eq!(bucket_of(&per_model, path, body), bucket, "{path} {body:?}");
        }
    }

    #[test]
    fn the_longest_family_wins_whatever_the_order() {
        for names in [["gpt-4o", "gpt-4o-mini"], ["gpt-4o-mini", "gpt-4o"]] {
            // Unsorted on purpose: the function does not rely on the configuration's order.
            let per_model: Vec<(String, ())> = names.iter().map(|n| (n.to_string(), ())).collect();
            assert_eq!(bucket_of(&per_model, CHAT, Some("gpt-4o-mini-2024-07-18")), Some("gpt-4o-mini"));
            assert_eq!(bucket_of(&per_model, CHAT, Some("gpt-4o-2024-05-13")), Some("gpt-4o"));
        }
        let per_model = configured(&["claude-3-5-sonnet", "claude-3-5-sonnet-v2"]);
        assert_eq!(bucket_of(&per_model, CHAT, Some("claude-3-5-sonnet-v2@20241022")), Some("claude-3-5-sonnet-v2"));
        // A configured snapshot is matched exactly, and never stands for its family.
        let per_model = configured(&["gpt-4o-2024-08-06"]);
        assert_eq!(bucket_of(&per_model, CHAT, Some("gpt-4o-2024-08-06")), Some("gpt-4o-2024-08-06"));
        assert_eq!(bucket_of(&per_model, CHAT, Some("gpt-4o")), None);
        assert_eq!(bucket_of(&per_model, CHAT, Some("gpt-4o-2024-11-20")), None);
        assert_eq!(model_bucket::<()>(&[], CHAT, Some("gpt-4o")), 0);
    }

    /// Seeded random names built from configured families, variants, versions and noise.
    #[test]
    fn any_name_picks_the_right_bucket_or_none_and_never_panics() {
        const FAMILIES: [&str; 6] = ["gpt-4o", "gpt-4o-mini", "o1", "claude-3-5-sonnet", "gemini-1.5-pro", "m"];
        const PIECES: [&str; 16] =
            ["-", "@", ":", "2024", "08", "20241022", "002", "v2", "latest", "mini", "preview", "1", "é", "/", "x", ""];
        let per_model = configured(&FAMILIES);
        let mut seed = 11_u64;
        let mut next = |n: usize| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) as usize % n
        };
        const VERSIONS: [&str; 7] = ["2024-08-06", "20241022", "002", "v2", "latest", "v2@20241022", "20240620-v1:0"];
        let mut versions = 0;
        for _ in 0..20_000 {
            let family = FAMILIES[next(FAMILIES.len())];
            let mut name = String::from(family);
            // Half are a version of their family, the others anything.
            let version = next(2) == 0;
            if version {
                name.push_str(["-", "@"][next(2)]);
                name.push_str(VERSIONS[next(VERSIONS.len())]);
            } else {
                for _ in 0..next(6) {
                    name.push_str(PIECES[next(PIECES.len())]);
                }
            }
            let got = bucket_of(&per_model, CHAT, Some(&name));
            // Exact, or a configured family the name is a version of: no letters but a version's.
            if let Some(family) = got {
                let rest = name.strip_prefix(family).unwrap_or_else(|| panic!("{name} drew on {family}"));
                assert!(rest.is_empty() || rest.starts_with(['-', '@']), "{name} drew on {family}");
                assert!(!rest.contains(|c: char| c.is_alphabetic() && !"vlatest".contains(c)), "{name} → {family}");
                versions += u32::from(!rest.is_empty());
            }
            if version {
                assert_eq!(got, Some(family), "{name}");
            }
            if FAMILIES.contains(&name.as_str()) {
                assert_eq!(got, Some(name.as_str()), "configured: exact");
            }
            // Through the path too (Gemini), the same answer.
            let path = format!("/v1beta/models/{name}:generateContent");
            if !name.contains([':', '/']) {
                assert_eq!(bucket_of(&per_model, &path, Some("gpt-4o")), got, "{path}");
            }
        }
        assert!(versions > 9_000, "{versions} names matched as versions of a family");
        // Any bytes as path and model: no panic, a bucket that exists.
        for _ in 0..5_000 {
            let junk: String = (0..next(40)).map(|_| PIECES[next(PIECES.len())]).collect();
            let _ = bucket_of(&per_model, &junk, Some(&junk));
        }
    }
}
