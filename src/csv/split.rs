//! Pass 1 of the parallel scan: find record boundaries that are correct even
//! when quoted fields contain newlines.
//!
//! In strict RFC 4180 every quoted field contributes an even number of `"`
//! bytes and no `"` appears elsewhere, so "inside quotes" at a byte offset is
//! exactly "odd number of `"` before it". Each block is scanned
//! independently for (a) the parity of its quote count and (b) the first
//! `\n` seen at even and at odd *local* parity. A sequential prefix-xor over
//! the blocks then gives each block's starting parity `P`, and its first
//! record start is `first_nl[P] + 1`. If the input is malformed the
//! boundaries after the first error may be wrong, but every boundary before
//! it is right, so the chunk holding the first error still reports it (see
//! `lib.rs`).

use memchr::{memchr, memchr2, memchr_iter};

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BlockScan {
    /// Odd number of `"` in the block.
    pub odd_quotes: bool,
    /// Offset of the first `\n` at even (index 0) / odd (index 1) local parity.
    pub first_nl: [Option<usize>; 2],
}

/// Scans `data[from..to]`.
pub(crate) fn scan_block(data: &[u8], from: usize, to: usize) -> BlockScan {
    let hay = &data[from..to];
    let mut parity = 0usize;
    let mut first: [Option<usize>; 2] = [None, None];
    let mut i = 0usize;
    while i < hay.len() && (first[0].is_none() || first[1].is_none()) {
        if first[parity].is_none() {
            match memchr2(b'"', b'\n', &hay[i..]) {
                None => {
                    i = hay.len();
                }
                Some(k) => {
                    let p = i + k;
                    if hay[p] == b'"' {
                        parity ^= 1;
                    } else {
                        first[parity] = Some(from + p);
                    }
                    i = p + 1;
                }
            }
        } else {
            // Already have a newline for this parity: jump to the next quote.
            match memchr(b'"', &hay[i..]) {
                None => {
                    i = hay.len();
                }
                Some(k) => {
                    parity ^= 1;
                    i += k + 1;
                }
            }
        }
    }
    if i < hay.len() {
        parity ^= memchr_iter(b'"', &hay[i..]).count() & 1;
    }
    BlockScan {
        odd_quotes: parity == 1,
        first_nl: first,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_newlines_by_parity() {
        let d = b"a\"b\nc\"\nd\"";
        let s = scan_block(d, 0, d.len());
        assert!(s.odd_quotes);
        assert_eq!(s.first_nl, [Some(6), Some(3)]);
        let s = scan_block(d, 4, d.len());
        assert_eq!(s.first_nl, [None, Some(6)]);
        assert!(!s.odd_quotes);
    }
}
