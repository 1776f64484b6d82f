//! Redis Cluster hash slots: which slot a key lives in, and a key of our own in every slot.
//!
//! A batch is sent as one pipeline per slot (a cluster pipeline must stay in one slot), and each
//! slot holds an epoch key, `product-cache:epoch:{<tag>}`, whose `<tag>` is chosen so that the
//! key hashes to that slot. The epoch key lives and dies with the slot's data (a restart, a
//! `FLUSHALL`, a replica promoted empty, a slot migrated with its keys), so its value says since
//! when the positions kept in that slot are complete; see `apply.lua`.

use std::sync::OnceLock;

/// Redis Cluster's slot count.
pub const SLOTS: u16 = 16384;

/// The slot of `key`: CRC16 (XMODEM) of its hash tag (the first non-empty `{...}`) or of the
/// whole key, modulo 16384, as Redis Cluster computes it.
pub fn slot_of(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(bytes)) % SLOTS
}

/// The epoch key of the slot `key` lives in.
pub fn epoch_key_for(key: &str) -> String {
    epoch_key_of_slot(slot_of(key))
}

/// The epoch key of `slot`.
pub fn epoch_key_of_slot(slot: u16) -> String {
    format!("product-cache:epoch:{{{}}}", tags()[usize::from(slot)])
}

/// For every slot, the shortest decimal string that hashes to it. Found once per process by
/// trying 0, 1, 2, ... (about 170,000 CRCs, a few milliseconds).
fn tags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); usize::from(SLOTS)];
        let mut missing = usize::from(SLOTS);
        let mut n: u64 = 0;
        while missing > 0 {
            let tag = n.to_string();
            let slot = &mut tags[usize::from(slot_of(&tag))];
            if slot.is_empty() {
                *slot = tag;
                missing -= 1;
            }
            n += 1;
        }
        tags
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_cluster() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot_of("123456789"), 0x31C3 % SLOTS);
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("{user1000}.following"), slot_of("user1000"));
        // An empty tag does not count, and only the first `{` opens one.
        assert_ne!(slot_of("foo{}{bar}"), slot_of("bar"));
        assert_eq!(slot_of("{product:42}:ver"), slot_of("product:42"));
    }

    #[test]
    fn every_slot_has_an_epoch_key_in_it() {
        for slot in 0..SLOTS {
            let tag = &tags()[usize::from(slot)];
            assert_eq!(slot_of(&format!("product-cache:epoch:{{{tag}}}")), slot);
        }
        assert_eq!(slot_of(&epoch_key_for("product:42")), slot_of("product:42"));
    }
}
