//! The wire format: frame types, headers, size limits, the reader's frame buffer and
//! the pieces of one send. Pure data: it never does I/O and knows nothing of streams
//! or credit.

use std::io;

use bytes::Buf;

use super::MAX_DATA;
use crate::copy;

pub(super) const HEADER: usize = 8;
pub(super) const MAX_OPEN: usize = 16 * 1024;
pub(super) const MAX_REPLY: usize = 16 * 1024;
const _: () = assert!(MAX_OPEN <= MAX_DATA && MAX_REPLY <= MAX_DATA);

pub(super) const DATA: u8 = 0;
pub(super) const OPEN: u8 = 1;
pub(super) const REPLY: u8 = 2;
pub(super) const FIN: u8 = 3;
pub(super) const RST: u8 = 4;
pub(super) const CREDIT: u8 = 5;
pub(super) const GOAWAY: u8 = 6;
/// Version 2 only.
pub(super) const PING: u8 = 7;
pub(super) const PONG: u8 = 8;
pub(super) const PING_LEN: usize = 8;

pub(super) fn header(kind: u8, len: usize, id: u32) -> [u8; HEADER] {
    let l = (len as u32).to_be_bytes();
    let i = id.to_be_bytes();
    [kind, l[1], l[2], l[3], i[0], i[1], i[2], i[3]]
}

/// The reader's buffer: small while the connection carries only control frames, and
/// the size of the largest frame (allocated and zeroed once, then reused) from its
/// first large frame until it has no stream left, so that an idle connection holds
/// about 1 KiB instead of 68. A DATA frame is written to its stream's socket straight
/// from here. Each read is bounded to finish the current frame and take at most the
/// next header, so that what is left after the complete frames is at most a header
/// (moved to the front), never part of a payload. (A fresh buffer per read would cost
/// a `memset`: tokio-rustls zeroes the part of a read buffer it does not know to be
/// initialised.)
pub(super) struct FrameBuf {
    buf: Vec<u8>,
    /// Where the window starts (`copy::DATA_PHASE` modulo 4096, in the large buffer).
    start: usize,
    len: usize,
    pub(super) filled: usize,
}

const FRAME_BUF: usize = HEADER + MAX_DATA + HEADER;
/// The small buffer: control frames (CREDIT, RST, FIN, GOAWAY, a REPLY or an OPEN with
/// a usual token) and short DATA fit.
pub(super) const SMALL_BUF: usize = 1024;

impl FrameBuf {
    pub(super) fn new() -> FrameBuf {
        FrameBuf {
            buf: vec![0u8; SMALL_BUF],
            start: 0,
            len: SMALL_BUF,
            filled: 0,
        }
    }

    pub(super) fn window(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }

    /// Makes the window at least `need` bytes long, keeping what it holds.
    pub(super) fn reserve(&mut self, need: usize) {
        if need <= self.len {
            return;
        }
        let mut buf = vec![0u8; FRAME_BUF + copy::PAGE];
        let start = copy::phase_offset(buf.as_ptr());
        buf[start..start + self.filled]
            .copy_from_slice(&self.buf[self.start..self.start + self.filled]);
        *self = FrameBuf {
            buf,
            start,
            len: FRAME_BUF,
            filled: self.filled,
        };
    }

    /// Back to the small buffer if the large one is not needed for what it holds.
    pub(super) fn shrink(&mut self) {
        if self.len == SMALL_BUF || self.filled > HEADER {
            return;
        }
        let mut buf = vec![0u8; SMALL_BUF];
        buf[..self.filled].copy_from_slice(&self.buf[self.start..self.start + self.filled]);
        *self = FrameBuf {
            buf,
            start: 0,
            len: SMALL_BUF,
            filled: self.filled,
        };
    }

    pub(super) fn is_large(&self) -> bool {
        self.len > SMALL_BUF
    }
}

/// The payload length in a frame header.
pub(super) fn frame_len(h: &[u8]) -> usize {
    u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize
}

/// Up to 5 slices written as one (vectored) write; rustls seals them into records
/// without gathering them first.
pub(super) struct Parts<'a> {
    parts: [&'a [u8]; 5],
    n: usize,
    i: usize,
}

impl<'a> Parts<'a> {
    pub(super) fn new(first: &'a [u8], rest: &[&'a [u8]]) -> Parts<'a> {
        let mut parts: [&[u8]; 5] = [&[]; 5];
        parts[0] = first;
        let n = 1 + rest.len().min(4);
        parts[1..n].copy_from_slice(&rest[..n - 1]);
        Parts { parts, n, i: 0 }
    }
}

impl Buf for Parts<'_> {
    fn remaining(&self) -> usize {
        self.parts[self.i..self.n].iter().map(|p| p.len()).sum()
    }

    fn chunk(&self) -> &[u8] {
        self.parts[self.i..self.n]
            .iter()
            .find(|p| !p.is_empty())
            .copied()
            .unwrap_or(&[])
    }

    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 && self.i < self.n {
            let p = &mut self.parts[self.i];
            if cnt >= p.len() {
                cnt -= p.len();
                self.i += 1;
            } else {
                *p = &p[cnt..];
                cnt = 0;
            }
        }
        while self.i < self.n && self.parts[self.i].is_empty() {
            self.i += 1;
        }
    }

    fn chunks_vectored<'b>(&'b self, dst: &mut [io::IoSlice<'b>]) -> usize {
        let mut k = 0;
        for p in self.parts[self.i..self.n].iter().filter(|p| !p.is_empty()) {
            if k == dst.len() {
                break;
            }
            dst[k] = io::IoSlice::new(p);
            k += 1;
        }
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffer_grows_for_a_large_frame_and_shrinks_back() {
        let mut fb = FrameBuf::new();
        assert!(!fb.is_large());
        fb.window()[..3].copy_from_slice(b"abc");
        fb.filled = 3;
        fb.reserve(SMALL_BUF);
        assert!(!fb.is_large(), "grown for what fits");
        fb.reserve(HEADER + MAX_DATA + HEADER);
        assert!(fb.is_large());
        assert_eq!(fb.window().len(), FRAME_BUF);
        assert_eq!(&fb.window()[..3], b"abc", "kept what it held");
        fb.shrink();
        assert!(!fb.is_large());
        assert_eq!(&fb.window()[..3], b"abc");
        fb.reserve(FRAME_BUF);
        fb.filled = HEADER + 1;
        fb.shrink();
        assert!(fb.is_large(), "shrunk while holding part of a frame");
    }
}
