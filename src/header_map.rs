//! The proxy-wasm encoding of a header map, both ways: serialized for the host (local replies,
//! HTTP calls), and read in place from it (a response's headers).

/// proxy-wasm header map encoding: count, then (key size, value size) pairs, then each key and
/// value followed by a NUL.
pub fn serialize(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + headers.iter().map(|(k, v)| 10 + k.len() + v.len()).sum::<usize>());
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    for (k, v) in headers {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in headers {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// A header map in the encoding `serialize` writes, read in place: one allocation for
/// the whole map, not two per header. A name or value that is not UTF-8 reads as empty.
#[derive(Default)]
pub struct HeaderMap {
    raw: Vec<u8>,
    /// Where each name and value lies in `raw`.
    spans: Vec<[usize; 4]>,
}

impl HeaderMap {
    /// Empty if the bytes do not follow the encoding.
    pub fn read(raw: Vec<u8>) -> HeaderMap {
        let spans = Self::spans(&raw).unwrap_or_default();
        HeaderMap { raw, spans }
    }

    fn spans(b: &[u8]) -> Option<Vec<[usize; 4]>> {
        let u32_at = |i: usize| Some(u32::from_le_bytes(b.get(i..i.checked_add(4)?)?.try_into().ok()?) as usize);
        let n = u32_at(0)?;
        let mut data = 4usize.checked_add(n.checked_mul(8)?)?;
        let mut out = Vec::with_capacity(n.min(256));
        for i in 0..n {
            let (kl, vl) = (u32_at(4 + 8 * i)?, u32_at(8 + 8 * i)?);
            let k = data;
            let v = k.checked_add(kl)?.checked_add(1)?;
            data = v.checked_add(vl)?.checked_add(1)?;
            b.get(v..=v + vl)?; // the value and its NUL
            out.push([k, k + kl, v, v + vl]);
        }
        Some(out)
    }

    /// (name, value) pairs, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        let text = |from: usize, to: usize| {
            std::str::from_utf8(self.raw.get(from..to).unwrap_or_default()).unwrap_or_default()
        };
        self.spans.iter().map(move |&[k, ke, v, ve]| (text(k, ke), text(v, ve)))
    }

    /// The first value of `name` (lower case, as the host gives names).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.iter().find(|&(k, _)| k == name).map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn reads_what_it_writes() {
        let pairs = [(":status", "429"), ("retry-after", "3"), ("x-empty", "")];
        let map = HeaderMap::read(serialize(&pairs));
        assert_eq!(map.iter().collect::<Vec<_>>(), pairs);
        assert_eq!(map.get("retry-after"), Some("3"));
        assert_eq!(map.get("Retry-After"), None, "names come lower case from the host");
        assert_eq!(HeaderMap::read(serialize(&[])).iter().count(), 0);
    }

    #[test]
    fn a_value_that_is_not_utf8_reads_as_empty() {
        let mut raw = serialize(&[("x-ratelimit-remaining", "12"), ("date", "now")]);
        let at = raw.windows(3).position(|w| w == b"12\0").unwrap();
        raw[at] = 0xff;
        let map = HeaderMap::read(raw);
        assert_eq!(map.get("x-ratelimit-remaining"), Some(""));
        assert_eq!(map.get("date"), Some("now"));
    }

    #[test]
    fn garbage_reads_as_no_headers_and_never_panics() {
        let good = serialize(&[("a", "b"), ("c", "d")]);
        for cut in 0..good.len() {
            assert_eq!(HeaderMap::read(good[..cut].to_vec()).iter().count(), 0, "cut at {cut}");
        }
        assert_eq!(HeaderMap::read(u32::MAX.to_le_bytes().to_vec()).iter().count(), 0);
        let mut lying = good.clone();
        lying[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(HeaderMap::read(lying).iter().count(), 0);
        // Seeded noise: whatever the bytes, reading and iterating is safe.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2_000 {
            let bytes: Vec<u8> = (0..(x % 64) as usize)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % 7) as u8
                })
                .collect();
            let map = HeaderMap::read(bytes);
            let _ = (map.iter().count(), map.get("a"));
        }
    }
}
