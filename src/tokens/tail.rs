//! JSON read from its end. Providers put an answer's `usage` after its text, so walking the
//! top-level members backwards finds it without reading the text before it.
//!
//! A string is stepped over by finding its opening quote: the nearest quote before the closing
//! one that is not escaped (preceded by an even number of backslashes), which is exact in valid
//! JSON. What is stepped over is not checked (UTF-8, escapes, numbers): brackets are counted,
//! and the values the caller keeps are parsed by it. Every step is bounds-checked, so any input
//! gives an answer or `None`, never a panic.
//!
//! ```
//! use llm_ratelimit::tokens::tail::Back;
//!
//! let mut b = Back::new(br#"{"text":"a \"quoted\" {word}","usage":{"n":[1,2]} }"#);
//! assert!(b.take(b'}'));
//! assert_eq!(b.member(), Some((&b"usage"[..], &br#"{"n":[1,2]}"#[..])));
//! assert!(b.take(b','));
//! assert_eq!(b.member(), Some((&b"text"[..], &br#""a \"quoted\" {word}""#[..])));
//! assert!(b.take(b'{') && b.at_start());
//! ```

/// Nesting deeper than serde_json's 128 levels is not stepped over.
const MAX_DEPTH: u32 = 128;

/// A reader moving leftwards: everything before `at` is still to read.
pub struct Back<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Back<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Back { bytes, at: bytes.len() }
    }

    /// The next byte (leftwards) after whitespace, not taken.
    pub fn peek(&mut self) -> Option<u8> {
        while let Some(&b) = self.at.checked_sub(1).and_then(|i| self.bytes.get(i)) {
            if !matches!(b, b' ' | b'\n' | b'\t' | b'\r') {
                return Some(b);
            }
            self.at -= 1;
        }
        None
    }

    /// Takes `byte` if it comes next.
    pub fn take(&mut self, byte: u8) -> bool {
        let next = self.peek() == Some(byte);
        if next {
            self.at -= 1;
        }
        next
    }

    /// Only whitespace is left.
    pub fn at_start(&mut self) -> bool {
        self.peek().is_none()
    }

    /// An object's member ending here: its key (`None` for one written with an escape, which
    /// only a full parse reads as serde_json does) and its value's text. Stops before the comma
    /// or the brace that precedes the member.
    pub fn member(&mut self) -> Option<(&'a [u8], &'a [u8])> {
        let value = self.value()?;
        if !self.take(b':') || self.peek()? != b'"' {
            return None;
        }
        let key = self.string()?;
        (!key.contains(&b'\\')).then_some((key, value))
    }

    /// The value ending here, stepped over: its text.
    pub fn value(&mut self) -> Option<&'a [u8]> {
        let last = self.peek()?;
        let end = self.at;
        match last {
            b'"' => {
                self.string()?;
            }
            b'}' | b']' => self.nested()?,
            _ => self.scalar()?,
        }
        self.bytes.get(self.at..end)
    }

    /// The string ending here: the bytes between its quotes.
    fn string(&mut self) -> Option<&'a [u8]> {
        let end = self.at.checked_sub(1)?;
        let mut at = end;
        loop {
            at = self.bytes.get(..at)?.iter().rposition(|&b| b == b'"')?;
            let backslashes = self.bytes.get(..at)?.iter().rev().take_while(|&&b| b == b'\\').count();
            if backslashes % 2 == 0 {
                self.at = at;
                return self.bytes.get(at + 1..end);
            }
        }
    }

    /// The array or object ending here.
    fn nested(&mut self) -> Option<()> {
        let mut depth = 0u32;
        loop {
            match self.peek()? {
                b'"' => {
                    self.string()?;
                    continue;
                }
                b'}' | b']' => depth += 1,
                b'{' | b'[' => depth = depth.checked_sub(1)?,
                _ => {}
            }
            if depth > MAX_DEPTH {
                return None;
            }
            self.at -= 1;
            if depth == 0 {
                return Some(());
            }
        }
    }

    /// The number, `true`, `false` or `null` ending here.
    fn scalar(&mut self) -> Option<()> {
        let end = self.at;
        while let Some(&b) = self.at.checked_sub(1).and_then(|i| self.bytes.get(i)) {
            if !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-')) {
                break;
            }
            self.at -= 1;
        }
        (self.at < end).then_some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    /// Every member of an object, last first.
    fn members(text: &[u8]) -> Option<Vec<(String, String)>> {
        let mut b = Back::new(text);
        let mut out = Vec::new();
        if !b.take(b'}') {
            return None;
        }
        if !b.take(b'{') {
            loop {
                let (k, v) = b.member()?;
                out.push((String::from_utf8_lossy(k).into_owned(), String::from_utf8_lossy(v).into_owned()));
                if b.take(b'{') {
                    break;
                }
                if !b.take(b',') {
                    return None;
                }
            }
        }
        b.at_start().then_some(out)
    }

    #[test]
    fn members_of_valid_json_are_what_serde_json_reads() {
        let texts = [
            r#"{}"#,
            r#" { "a" : 1 , "b":[1,{"c":"]}"}],"d":"\\","e":"\\\"","f":null,"g":-1.5e+3,"h":true } "#,
            r#"{"x":{"y":{"z":[[],{}]}},"s":"{[\"]}"}"#,
            r#"{"u":"é\u00e9 ☃","v":""}"#,
        ];
        for text in texts {
            let value: serde_json::Value = serde_json::from_str(text).unwrap();
            let want: Vec<(String, String)> =
                value.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.to_string())).rev().collect();
            let got = members(text.as_bytes()).unwrap_or_else(|| panic!("{text}"));
            // Keys and values as serde_json reads them (the object's keys are sorted there).
            let mut got: Vec<(String, String)> = got
                .into_iter()
                .map(|(k, v)| (k, serde_json::from_str::<serde_json::Value>(&v).unwrap().to_string()))
                .collect();
            let mut want = want;
            got.sort();
            want.sort();
            assert_eq!(got, want, "{text}");
        }
    }

    #[test]
    fn escaped_keys_and_broken_text_give_none_never_a_panic() {
        assert_eq!(members(br#"{"\u0075sage":1}"#), None);
        for text in [&b""[..], b"}", b"{", b"\"}", b":1}", b"{\"a\":}", b"{\"a\" 1}", b"\\\"}", b"]]]]}"] {
            assert_eq!(members(text), None, "{}", String::from_utf8_lossy(text));
        }
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(200), "]".repeat(200));
        assert_eq!(members(deep.as_bytes()), None);
        // Any bytes: no panic.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let len = (x % 24) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let alphabet = b"{}[]\":,\\ a1";
                    alphabet[(x % alphabet.len() as u64) as usize]
                })
                .collect();
            let _ = members(&bytes);
        }
    }
}
