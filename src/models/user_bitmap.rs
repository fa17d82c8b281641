//! The stored form of a set of users: a roaring bitmap of user ordinals in roaring's
//! portable serialization. The fold writes it to the user-activity rollups; the count
//! cache keeps the union of those bitmaps in the same form.

use roaring::RoaringBitmap;

/// Bytes that are not a bitmap in the stored form.
#[derive(Debug, thiserror::Error)]
#[error("user bitmap does not decode: {0}")]
pub struct BitmapDecodeError(#[source] std::io::Error);

/// The stored form of `users`.
pub fn encode_users(users: &RoaringBitmap) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(users.serialized_size());
    users.serialize_into(&mut bytes).expect("writing to a Vec cannot fail");
    bytes
}

/// The users held in `bytes`, the stored form.
pub fn decode_users(bytes: &[u8]) -> Result<RoaringBitmap, BitmapDecodeError> {
    RoaringBitmap::deserialize_from(bytes).map_err(BitmapDecodeError)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_survive_the_stored_form() {
        let users: RoaringBitmap = [0, 7, 65_536, 1_000_000].into_iter().collect();
        assert_eq!(decode_users(&encode_users(&users)).unwrap(), users);
        assert_eq!(decode_users(&encode_users(&RoaringBitmap::new())).unwrap(), RoaringBitmap::new());
        assert!(decode_users(b"not a bitmap").is_err());
    }
}
