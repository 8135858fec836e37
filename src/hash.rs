//! A stable 64-bit hash (FNV-1a) for shared-data keys: the same in every worker and across
//! restarts, with no dependency.

/// Hashes `parts` in order; a separator byte keeps ("ab", "c") and ("a", "bc") apart.
pub fn stable_hash(parts: &[&str]) -> u64 {
    parts.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, part| {
        part.bytes().chain([0xff]).fold(h, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
    })
}

/// SplitMix64's finalizer: spreads nearby inputs over all 64 bits (for picking table slots).
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Draw `i` of the candidate slots, in `0..slots` (`slots` > 0), of a key with hash `hash` in a
/// shared-data slot table: SplitMix64 steps from the hash, independent and well spread. The two
/// 4-way tables (`tenants`, `fallback`) both draw with it; what they do with the draws differs on
/// purpose (see `tenants::candidates` and `fallback::candidates`).
pub fn slot_draw(hash: u64, i: u64, slots: u64) -> u64 {
    mix(hash.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15))) % slots
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn stable_and_separating() {
        assert_eq!(stable_hash(&["a", "bc"]), stable_hash(&["a", "bc"]));
        assert_ne!(stable_hash(&["ab", "c"]), stable_hash(&["a", "bc"]));
        assert_ne!(stable_hash(&["x"]), stable_hash(&["y"]));
        // No parts: the FNV offset basis. Fixed forever: shared-data keys depend on it.
        assert_eq!(stable_hash(&[]), 0xcbf2_9ce4_8422_2325);
    }
}
