//! Redis Cluster hash slots: which of the 16384 slots a key belongs to (CRC16-XMODEM of
//! the key, or of its `{hash tag}` when it has a non-empty one). Keys of one script call
//! must share a slot in cluster mode; standalone Redis has no such restriction.

/// Slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// The hash slot of `key`, as Redis Cluster computes it. Only the part between the first
/// `{` and the next `}` counts when that part is non-empty.
#[allow(dead_code, reason = "grouping of script calls by slot, for cluster mode")]
pub(super) fn slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key)) % SLOTS
}

fn hash_tag(key: &[u8]) -> &[u8] {
    let Some(open) = key.iter().position(|&byte| byte == b'{') else {
        return key;
    };
    match key[open + 1..].iter().position(|&byte| byte == b'}') {
        Some(0) | None => key,
        Some(length) => &key[open + 1..open + 1 + length],
    }
}

/// CRC16-XMODEM (polynomial 0x1021, initial value 0), the checksum Redis Cluster uses.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_cluster() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS, "an empty tag hashes the key");
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"), "the tag ends at the first closing brace");
        assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"), "only the first tag counts");
    }
}
