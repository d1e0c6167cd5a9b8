//! `output.idx`: a sequence of fixed-size records `[channel: u8][len: u32 LE]`.
//!
//! The monitor appends the bytes to `output.log` first and the record second, so every record that
//! is visible describes bytes that are already in the log. Record `i` covers the log bytes from the
//! sum of the lengths before it. Channel 1 is stdout, 2 is stderr.

/// Size of one record in bytes.
pub const RECORD_LEN: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub channel: u8,
    pub len: u32,
}

impl Record {
    pub fn encode(self) -> [u8; RECORD_LEN] {
        let l = self.len.to_le_bytes();
        [self.channel, l[0], l[1], l[2], l[3]]
    }

    pub fn decode(bytes: &[u8; RECORD_LEN]) -> Self {
        Record {
            channel: bytes[0],
            len: u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]),
        }
    }
}

/// Decode every complete record in `buf` (a trailing partial record is ignored).
pub fn decode_all(buf: &[u8]) -> Vec<Record> {
    buf.chunks_exact(RECORD_LEN)
        .map(|c| {
            let mut r = [0u8; RECORD_LEN];
            r.copy_from_slice(c);
            Record::decode(&r)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_partial_tail_is_ignored() {
        let a = Record {
            channel: 1,
            len: 70000,
        };
        let b = Record { channel: 2, len: 3 };
        let mut buf = Vec::new();
        buf.extend_from_slice(&a.encode());
        buf.extend_from_slice(&b.encode());
        buf.extend_from_slice(&[1, 2]);
        assert_eq!(decode_all(&buf), vec![a, b]);
    }
}
