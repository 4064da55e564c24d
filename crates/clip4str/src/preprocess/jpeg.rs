//! JPEG decoding that reproduces libjpeg-turbo bit for bit, because the reference reads images
//! with Pillow, which decodes JPEG through libjpeg-turbo (ISLOW inverse DCT, "fancy" triangle
//! upsampling, table-driven YCbCr->RGB). The pure-Rust decoders behind `image` use other IDCTs and
//! upsamplers and differ from Pillow by up to a few grey levels on ordinary photos.
//!
//! Supported: baseline, extended-sequential and progressive Huffman-coded 8-bit JPEGs with 1, 3 or
//! 4 components (grey, YCbCr/RGB, CMYK/YCCK), any integral sampling factors, restart intervals,
//! multi-scan files and Motion-JPEG frames without Huffman tables. Damaged files follow libjpeg's
//! recovery rules (bit-buffer refills, zero padding at markers, restart resynchronisation,
//! saturating x86 SIMD inverse DCT), so they decode -- or fail, where Pillow fails -- the same way.
//!
//! Not reproduced: arithmetic-coded files (which Pillow can read) are reported as unsupported, as
//! are lossless, hierarchical and 12-bit files (which Pillow cannot read either); and the
//! inter-block smoothing libjpeg applies to a progressive file whose scans stop early (e.g. an
//! EOI in the middle) is not applied.
//!
//! Written from the JPEG standard (ITU-T T.81) and libjpeg-turbo 2.1's documented behaviour;
//! checked against Pillow 9.5.0 (libjpeg-turbo 2.1.5) and `djpeg` on ~1,400 generated files.

use std::fmt;

/// Colour model of the decoded samples: what libjpeg hands to Pillow (`L`, `RGB` or `CMYK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JpegColor {
    /// One channel.
    Gray,
    /// Three channels, red/green/blue.
    Rgb,
    /// Four channels as stored (Adobe files store them inverted; the caller handles that).
    Cmyk,
}

/// Decoded samples, interleaved row-major, 1, 3 or 4 bytes per pixel depending on `color`.
#[derive(Debug)]
pub(crate) struct JpegImage {
    pub width: u32,
    pub height: u32,
    pub color: JpegColor,
    pub data: Vec<u8>,
}

/// Why a JPEG could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum JpegError {
    /// The stream breaks the JPEG syntax.
    Invalid(String),
    /// The data ends before the image is complete (Pillow: "image file is truncated").
    Truncated,
    /// A valid JPEG variant this decoder does not handle.
    Unsupported(String),
    /// The frame header announces more pixels than allowed.
    TooLarge { width: u32, height: u32 },
}

impl fmt::Display for JpegError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JpegError::Invalid(reason) => write!(f, "invalid JPEG: {reason}"),
            JpegError::Truncated => write!(f, "JPEG data is truncated"),
            JpegError::Unsupported(reason) => write!(f, "unsupported JPEG: {reason}"),
            JpegError::TooLarge { width, height } => {
                write!(f, "JPEG is {width}x{height}, over the pixel limit")
            }
        }
    }
}

type Result<T> = std::result::Result<T, JpegError>;

fn invalid<T>(reason: &str) -> Result<T> {
    Err(JpegError::Invalid(reason.to_string()))
}

/// Zig-zag index -> natural (row-major) index, padded with 16 extra entries so that a corrupt
/// run length that overshoots coefficient 63 lands on 63 instead of out of bounds (as libjpeg).
const NATURAL_ORDER: [usize; 80] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63, 63,
    63, 63, 63, 63, 63, 63,
];

/// libjpeg refuses frames larger than this in either direction.
const MAX_DIMENSION: u32 = 65_500;
/// libjpeg's limit on blocks per MCU of an interleaved scan.
const MAX_BLOCKS_IN_MCU: usize = 10;

// ---------------------------------------------------------------------------------------------
// Huffman tables
// ---------------------------------------------------------------------------------------------

/// Bits per code of the fast lookup table (libjpeg's `HUFF_LOOKAHEAD`).
const LOOKAHEAD: u32 = 8;

/// A Huffman table ready for decoding: a lookup on the next 9 bits plus the canonical-code
/// limits per length for longer codes.
#[derive(Clone)]
struct HuffTable {
    /// `(length << 8) | symbol` for codes of at most `LOOKAHEAD` bits, 0 when longer.
    lookup: Vec<u16>,
    /// Largest code of each length (index 1..=16), -1 if the length is unused.
    max_code: [i32; 17],
    /// Symbol index minus code, per length.
    val_offset: [i32; 17],
    /// Symbols in code order, zero-padded to 256 like libjpeg's `huffval`.
    values: [u8; 256],
    /// Number of symbols.
    count: usize,
}

impl HuffTable {
    /// Builds the decoding structures from a DHT's 16 counts and its symbols, rejecting code
    /// sets that do not fit their lengths (libjpeg's `jpeg_make_d_derived_tbl`).
    fn new(counts: &[u8; 16], values: &[u8]) -> Result<Self> {
        let total: usize = counts.iter().map(|&c| c as usize).sum();
        if total > 256 || total != values.len() {
            return invalid("bad Huffman table");
        }
        let mut sizes = Vec::with_capacity(total);
        for (len, &count) in counts.iter().enumerate() {
            sizes.extend(std::iter::repeat_n(len as u32 + 1, count as usize));
        }
        let mut codes = Vec::with_capacity(total);
        let mut code: u32 = 0;
        let mut size = sizes.first().copied().unwrap_or(1);
        let mut p = 0;
        while p < total {
            while p < total && sizes[p] == size {
                codes.push(code);
                code += 1;
                p += 1;
            }
            if code >= (1 << size) {
                return invalid("bad Huffman table");
            }
            code <<= 1;
            size += 1;
        }
        let mut max_code = [-1i32; 17];
        let mut val_offset = [0i32; 17];
        let mut p = 0usize;
        for len in 1..=16usize {
            let count = counts[len - 1] as usize;
            if count > 0 {
                val_offset[len] = p as i32 - codes[p] as i32;
                p += count;
                max_code[len] = codes[p - 1] as i32;
            }
        }
        let mut lookup = vec![0u16; 1 << LOOKAHEAD];
        for (i, (&len, &code)) in sizes.iter().zip(&codes).enumerate() {
            if len <= LOOKAHEAD {
                let shift = LOOKAHEAD - len;
                let first = (code << shift) as usize;
                let entry = ((len as u16) << 8) | values[i] as u16;
                for slot in &mut lookup[first..first + (1 << shift)] {
                    *slot = entry;
                }
            }
        }
        let mut padded = [0u8; 256];
        padded[..total].copy_from_slice(values);
        Ok(HuffTable {
            lookup,
            max_code,
            val_offset,
            values: padded,
            count: total,
        })
    }

    /// True when every symbol is a valid DC magnitude category (libjpeg checks this per scan).
    fn valid_for_dc(&self) -> bool {
        self.values[..self.count].iter().all(|&v| v <= 15)
    }
}

/// The tables of ITU-T T.81 Annex K.3, which libjpeg-turbo installs in slots 0 and 1 when a
/// stream (typically a Motion-JPEG frame) does not define them.
fn standard_tables() -> [HuffSpec; 4] {
    const DC_LUMA_COUNTS: [u8; 16] = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
    const DC_CHROMA_COUNTS: [u8; 16] = [0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0];
    const DC_VALUES: [u8; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
    const AC_LUMA_COUNTS: [u8; 16] = [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7d];
    const AC_LUMA_VALUES: [u8; 162] = [
        0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61,
        0x07, 0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xa1, 0x08, 0x23, 0x42, 0xb1, 0xc1, 0x15, 0x52,
        0xd1, 0xf0, 0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0a, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x25,
        0x26, 0x27, 0x28, 0x29, 0x2a, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44, 0x45,
        0x46, 0x47, 0x48, 0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63, 0x64,
        0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a, 0x83,
        0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99,
        0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4, 0xb5, 0xb6,
        0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca, 0xd2, 0xd3,
        0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe1, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7, 0xe8,
        0xe9, 0xea, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa,
    ];
    const AC_CHROMA_COUNTS: [u8; 16] = [0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 0x77];
    const AC_CHROMA_VALUES: [u8; 162] = [
        0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07, 0x61,
        0x71, 0x13, 0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xa1, 0xb1, 0xc1, 0x09, 0x23, 0x33,
        0x52, 0xf0, 0x15, 0x62, 0x72, 0xd1, 0x0a, 0x16, 0x24, 0x34, 0xe1, 0x25, 0xf1, 0x17, 0x18,
        0x19, 0x1a, 0x26, 0x27, 0x28, 0x29, 0x2a, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3a, 0x43, 0x44,
        0x45, 0x46, 0x47, 0x48, 0x49, 0x4a, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5a, 0x63,
        0x64, 0x65, 0x66, 0x67, 0x68, 0x69, 0x6a, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7a,
        0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8a, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97,
        0x98, 0x99, 0x9a, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xb2, 0xb3, 0xb4,
        0xb5, 0xb6, 0xb7, 0xb8, 0xb9, 0xba, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7, 0xc8, 0xc9, 0xca,
        0xd2, 0xd3, 0xd4, 0xd5, 0xd6, 0xd7, 0xd8, 0xd9, 0xda, 0xe2, 0xe3, 0xe4, 0xe5, 0xe6, 0xe7,
        0xe8, 0xe9, 0xea, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa,
    ];
    let spec = |counts: &[u8; 16], values: &[u8]| HuffSpec {
        counts: *counts,
        values: values.to_vec(),
    };
    [
        spec(&DC_LUMA_COUNTS, &DC_VALUES),
        spec(&DC_CHROMA_COUNTS, &DC_VALUES),
        spec(&AC_LUMA_COUNTS, &AC_LUMA_VALUES),
        spec(&AC_CHROMA_COUNTS, &AC_CHROMA_VALUES),
    ]
}

// ---------------------------------------------------------------------------------------------
// Entropy-coded segment reader
// ---------------------------------------------------------------------------------------------

/// libjpeg-turbo's bit-buffer refill target on 64-bit platforms (`MIN_GET_BITS`).
const MIN_GET_BITS: u32 = 57;

/// Reads bits from an entropy-coded segment, removing the 0x00 stuffed after 0xFF and stopping
/// at markers. It mirrors libjpeg-turbo's `jpeg_fill_bit_buffer` exactly, because the points
/// where libjpeg refills decide how damaged files decode: a refill that runs into the end of
/// the data makes libjpeg suspend (Pillow then reports a truncated file), and a request for
/// more bits than remain before a marker makes it give up on the rest of the segment.
struct BitReader<'a> {
    data: &'a [u8],
    /// Next byte to load.
    pos: usize,
    /// Pending bits, most significant first; bits below `nbits` are zero.
    acc: u64,
    /// Number of valid (data or padding) bits in `acc`.
    nbits: u32,
    /// `pos` is at a marker (0xFF followed by a marker code); no more data bytes follow.
    at_marker: bool,
    /// A refill reached the end of the input: libjpeg would suspend here.
    starved: bool,
    /// libjpeg's `insufficient_data`: the segment ran out, remaining MCUs are not decoded.
    insufficient: bool,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        BitReader {
            data,
            pos,
            acc: 0,
            nbits: 0,
            at_marker: false,
            starved: false,
            insufficient: false,
        }
    }

    /// libjpeg's refill: load bytes up to `MIN_GET_BITS`; at a marker, if fewer than `need`
    /// bits remain, pad with zeros to `MIN_GET_BITS` and mark the segment as exhausted.
    fn fill(&mut self, need: u32) {
        while !self.at_marker && self.nbits < MIN_GET_BITS {
            match self.next_byte() {
                Some(byte) => {
                    self.acc |= u64::from(byte) << (56 - self.nbits);
                    self.nbits += 8;
                }
                None if self.at_marker => {}
                None => {
                    // End of input inside the segment: libjpeg suspends for more data.
                    self.starved = true;
                    self.nbits = MIN_GET_BITS.max(self.nbits);
                    return;
                }
            }
        }
        // At the marker that ends the segment: only a request that cannot be met gets zero
        // padding, and it marks the segment as exhausted.
        if self.at_marker && need > self.nbits {
            self.insufficient = true;
            self.nbits = MIN_GET_BITS;
        }
    }

    /// Next data byte, or `None` at a marker (setting `at_marker`) or at the end of input.
    fn next_byte(&mut self) -> Option<u8> {
        let byte = *self.data.get(self.pos)?;
        if byte != 0xFF {
            self.pos += 1;
            return Some(byte);
        }
        // 0xFF: skip fill bytes, then 0x00 means a literal 0xFF, anything else is a marker.
        let mut next = self.pos + 1;
        while self.data.get(next) == Some(&0xFF) {
            next += 1;
        }
        match self.data.get(next) {
            Some(0) => {
                self.pos = next + 1;
                Some(0xFF)
            }
            Some(_) => {
                self.pos = next - 1;
                self.at_marker = true;
                None
            }
            None => {
                self.pos = self.data.len();
                None
            }
        }
    }

    #[inline]
    fn consume(&mut self, n: u32) {
        self.acc <<= n;
        self.nbits -= n;
    }

    /// Next `n` (0..=16) bits as an unsigned number (libjpeg `CHECK_BIT_BUFFER` + `GET_BITS`).
    #[inline]
    fn bits(&mut self, n: u32) -> i32 {
        if n == 0 {
            return 0;
        }
        if self.nbits < n {
            self.fill(n);
        }
        let value = (self.acc >> (64 - n)) as i32;
        self.consume(n);
        value
    }

    #[inline]
    fn bit(&mut self) -> bool {
        self.bits(1) != 0
    }

    /// Next Huffman-coded symbol, following libjpeg's `HUFF_DECODE`: an 8-bit lookahead, then
    /// bit by bit for longer codes. An invalid code consumes up to 17 bits and decodes as 0.
    #[inline]
    fn decode(&mut self, table: &HuffTable) -> u8 {
        if self.nbits < LOOKAHEAD {
            self.fill(0);
        }
        // Near a marker fewer than 8 bits may be left: then decode bit by bit from length 1.
        let mut len = 1;
        if self.nbits >= LOOKAHEAD {
            let entry = table.lookup[(self.acc >> (64 - LOOKAHEAD)) as usize];
            if entry != 0 {
                self.consume(u32::from(entry >> 8));
                return entry as u8;
            }
            len = LOOKAHEAD as usize + 1;
        }
        let mut code = self.bits(len as u32);
        while len <= 16 && code > table.max_code[len] {
            code = (code << 1) | self.bits(1);
            len += 1;
        }
        if len > 16 {
            return 0;
        }
        table.values[((code + table.val_offset[len]) & 0xFF) as usize]
    }

    /// Magnitude category `s` followed by `s` raw bits -> signed value (T.81 F.2.2.1 EXTEND).
    #[inline]
    fn receive_extend(&mut self, s: u32) -> i32 {
        if s == 0 {
            return 0;
        }
        let value = self.bits(s);
        if value < (1 << (s - 1)) {
            value - (1 << s) + 1
        } else {
            value
        }
    }

    /// libjpeg's `process_restart`: drop pending bits, then read the restart marker, expecting
    /// RST`expected`. A different marker goes through `jpeg_resync_to_restart`'s decision table
    /// (skip it, scan on, or leave it so the following MCUs see an empty segment).
    fn restart(&mut self, expected: &mut u8) -> Result<()> {
        self.acc = 0;
        self.nbits = 0;
        let (mut marker, mut at) = find_marker(self.data, self.pos).ok_or(JpegError::Truncated)?;
        let wanted = 0xD0 + *expected;
        loop {
            let action = if marker == wanted {
                1
            } else if marker < 0xC0 {
                2
            } else if !(0xD0..=0xD7).contains(&marker) {
                3
            } else {
                let distance = marker.wrapping_sub(wanted) & 7;
                match distance {
                    1 | 2 => 3,
                    6 | 7 => 2,
                    _ => 1,
                }
            };
            match action {
                1 => {
                    self.pos = at + 2;
                    self.at_marker = false;
                    break;
                }
                2 => {
                    (marker, at) = find_marker(self.data, at + 2).ok_or(JpegError::Truncated)?;
                }
                _ => {
                    self.pos = at;
                    self.at_marker = true;
                    break;
                }
            }
        }
        *expected = (*expected + 1) & 7;
        if !self.at_marker {
            self.insufficient = false;
        }
        Ok(())
    }

    /// Position of the marker that ends this segment (or where reading stopped).
    fn end_position(&self) -> usize {
        self.pos
    }
}

/// Finds the next marker at or after `pos`, skipping garbage and fill bytes like libjpeg's
/// `next_marker`. Returns the marker code and the index of the 0xFF that precedes it.
fn find_marker(data: &[u8], mut pos: usize) -> Option<(u8, usize)> {
    loop {
        while *data.get(pos)? != 0xFF {
            pos += 1;
        }
        let mut next = pos + 1;
        while *data.get(next)? == 0xFF {
            next += 1;
        }
        let code = data[next];
        if code != 0 {
            return Some((code, next - 1));
        }
        pos = next + 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Frame and scan structures
// ---------------------------------------------------------------------------------------------

/// One colour component of the frame with its whole-image coefficient buffer.
struct Component {
    id: u8,
    h: usize,
    v: usize,
    quant_slot: usize,
    /// Quantisation table latched at the component's first scan (natural order).
    quant: Option<[u16; 64]>,
    /// Blocks covering the component's own samples (the extent of a non-interleaved scan).
    blocks_w: usize,
    blocks_h: usize,
    /// Blocks allocated per row: whole MCUs, so interleaved scans can store dummy blocks.
    stride_blocks: usize,
    /// Quantised DCT coefficients, natural order, 64 per block.
    coefs: Vec<i16>,
    /// Last DC value of the current scan (DC prediction).
    dc_pred: i32,
}

impl Component {
    fn block_mut(&mut self, bx: usize, by: usize) -> &mut [i16] {
        let start = (by * self.stride_blocks + bx) * 64;
        &mut self.coefs[start..start + 64]
    }
}

struct Frame {
    width: usize,
    height: usize,
    progressive: bool,
    components: Vec<Component>,
    max_h: usize,
    max_v: usize,
    mcus_x: usize,
    mcus_y: usize,
}

/// The parameters of one SOS segment.
struct Scan {
    /// Indices into `Frame::components`, in scan order.
    comps: Vec<usize>,
    dc_slots: Vec<usize>,
    ac_slots: Vec<usize>,
    ss: usize,
    se: usize,
    ah: u32,
    al: u32,
}

/// Which coding step a progressive (or sequential) scan performs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Sequential,
    DcFirst,
    DcRefine,
    AcFirst,
    AcRefine,
}

/// A Huffman table as defined by DHT (or the standard default), turned into a [`HuffTable`]
/// only when a scan uses it, since libjpeg validates tables at that point.
#[derive(Clone)]
struct HuffSpec {
    counts: [u8; 16],
    values: Vec<u8>,
}

impl HuffSpec {
    fn build(&self, dc: bool) -> Result<HuffTable> {
        let table = HuffTable::new(&self.counts, &self.values)?;
        if dc && !table.valid_for_dc() {
            return invalid("bad DC Huffman table");
        }
        Ok(table)
    }
}

/// Sequential reads from the stream for marker parameters. Running past the end of the data
/// is `Truncated` (libjpeg suspends), so structural errors found before that point win, as
/// they do in libjpeg, which validates while it reads.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn u8(&mut self) -> Result<u8> {
        let byte = *self.data.get(self.pos).ok_or(JpegError::Truncated)?;
        self.pos += 1;
        Ok(byte)
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }

    /// Skips `n` bytes (`skip_input_data`); skipping past the end needs more data.
    fn skip(&mut self, n: usize) -> Result<()> {
        if self.data.len() - self.pos < n {
            return Err(JpegError::Truncated);
        }
        self.pos += n;
        Ok(())
    }
}

struct Decoder<'a> {
    data: &'a [u8],
    pos: usize,
    max_pixels: u64,
    quant: [Option<[u16; 64]>; 4],
    dc_tables: [Option<HuffSpec>; 4],
    ac_tables: [Option<HuffSpec>; 4],
    restart_interval: usize,
    frame: Option<Frame>,
    jfif: bool,
    adobe_transform: Option<u8>,
    scans: usize,
    /// The single scan of a sequential image has been decoded; libjpeg still parses the
    /// markers up to EOI (in `jpeg_finish_decompress`), and an error there is still fatal.
    image_complete: bool,
}

/// Decodes a whole JPEG file as Pillow's `Image.open(..)` + `load()` sees it.
pub(crate) fn decode(data: &[u8], max_pixels: u64) -> Result<JpegImage> {
    if data.len() < 2 || data[0] != 0xFF || data[1] != 0xD8 {
        return invalid("missing SOI marker");
    }
    let mut decoder = Decoder {
        data,
        pos: 2,
        max_pixels,
        quant: [None; 4],
        dc_tables: [None, None, None, None],
        ac_tables: [None, None, None, None],
        restart_interval: 0,
        frame: None,
        jfif: false,
        adobe_transform: None,
        scans: 0,
        image_complete: false,
    };
    match decoder.read_stream() {
        // After the last row, libjpeg suspending for more data is not an error for Pillow.
        Err(JpegError::Truncated) if decoder.image_complete => {}
        other => other?,
    }
    decoder.finish()
}

impl<'a> Decoder<'a> {
    /// Processes markers up to EOI (libjpeg `read_markers`, then the scans).
    fn read_stream(&mut self) -> Result<()> {
        loop {
            let Some((marker, at)) = find_marker(self.data, self.pos) else {
                return self.end_without_eoi();
            };
            self.pos = at + 2;
            let mut cursor = Cursor {
                data: self.data,
                pos: self.pos,
            };
            match marker {
                0xD8 => return invalid("duplicate SOI marker"),
                0xD9 => {
                    if self.scans == 0 {
                        return invalid("no image data before EOI");
                    }
                    return Ok(());
                }
                0xD0..=0xD7 | 0x01 => {}
                0xC0..=0xC2 => self.read_frame(&mut cursor, marker == 0xC2)?,
                0xC3 | 0xC5..=0xCB | 0xCD..=0xCF => {
                    let kind = match marker {
                        0xC3 | 0xCB => "lossless",
                        0xC5..=0xC7 | 0xCD..=0xCF => "hierarchical",
                        0xC8 => "reserved (JPG)",
                        _ => "arithmetic-coded",
                    };
                    return Err(JpegError::Unsupported(format!("{kind} JPEG")));
                }
                0xC4 => self.read_huffman_tables(&mut cursor)?,
                0xDB => self.read_quant_tables(&mut cursor)?,
                0xDD => {
                    if cursor.u16()? != 4 {
                        return invalid("bad DRI length");
                    }
                    self.restart_interval = cursor.u16()? as usize;
                }
                0xDA => {
                    if self.image_complete {
                        // libjpeg: a second scan in a single-scan image is fatal.
                        return invalid("unexpected second scan (EOI expected)");
                    }
                    let scan = self.read_scan_header(&mut cursor)?;
                    self.pos = cursor.pos;
                    self.image_complete = self.decode_scan(&scan)?;
                    continue;
                }
                0xE0 | 0xEE => self.read_app(&mut cursor, marker)?,
                0xCC | 0xDC | 0xE1..=0xED | 0xEF | 0xFE => {
                    let length = cursor.u16()? as usize;
                    cursor.skip(length.saturating_sub(2))?;
                }
                _ => return invalid(&format!("unknown marker 0xFF{marker:02X}")),
            }
            self.pos = cursor.pos;
        }
    }

    /// Running out of data before EOI. A single-scan sequential image is complete as soon as
    /// its scan is (libjpeg has output every row and Pillow ignores the suspended
    /// `jpeg_finish_decompress`); a buffered image is still waiting for data: truncated.
    fn end_without_eoi(&self) -> Result<()> {
        if self.image_complete {
            Ok(())
        } else {
            Err(JpegError::Truncated)
        }
    }

    /// APP0 (JFIF) and APP14 (Adobe), which steer the colour-space guess. Like libjpeg, only
    /// the first 14 bytes are examined.
    fn read_app(&mut self, cursor: &mut Cursor, marker: u8) -> Result<()> {
        let length = (cursor.u16()? as usize).saturating_sub(2);
        let mut head = Vec::with_capacity(14);
        for _ in 0..length.min(14) {
            head.push(cursor.u8()?);
        }
        if marker == 0xE0 && head.len() >= 14 && head.starts_with(b"JFIF\0") {
            self.jfif = true;
        }
        if marker == 0xEE && head.len() >= 12 && head.starts_with(b"Adobe") {
            self.adobe_transform = Some(head[11]);
        }
        cursor.skip(length - head.len())
    }

    fn read_frame(&mut self, cursor: &mut Cursor, progressive: bool) -> Result<()> {
        let length = cursor.u16()? as usize;
        let precision = cursor.u8()?;
        let height = u32::from(cursor.u16()?);
        let width = u32::from(cursor.u16()?);
        let count = cursor.u8()? as usize;
        if self.frame.is_some() {
            return invalid("duplicate frame header");
        }
        if width == 0 || height == 0 || count == 0 {
            return invalid("empty image (zero width, height or components)");
        }
        if length != 8 + 3 * count {
            return invalid("bad frame header length");
        }
        let mut specs = Vec::with_capacity(count);
        for _ in 0..count {
            let id = cursor.u8()?;
            let sampling = cursor.u8()?;
            let quant_slot = cursor.u8()? as usize;
            specs.push((
                id,
                (sampling >> 4) as usize,
                (sampling & 15) as usize,
                quant_slot,
            ));
        }
        if precision != 8 {
            return Err(JpegError::Unsupported(format!("{precision}-bit samples")));
        }
        if !matches!(count, 1 | 3 | 4) {
            return Err(JpegError::Unsupported(format!("{count} components")));
        }
        if width > MAX_DIMENSION
            || height > MAX_DIMENSION
            || u64::from(width) * u64::from(height) > self.max_pixels
        {
            return Err(JpegError::TooLarge { width, height });
        }
        for &(_, h, v, quant_slot) in &specs {
            if !(1..=4).contains(&h) || !(1..=4).contains(&v) {
                return invalid("bad sampling factors");
            }
            if quant_slot > 3 {
                return invalid("bad quantisation table index");
            }
        }
        let max_h = specs.iter().map(|s| s.1).max().unwrap_or(1);
        let max_v = specs.iter().map(|s| s.2).max().unwrap_or(1);
        let (width, height) = (width as usize, height as usize);
        let mcus_x = width.div_ceil(8 * max_h);
        let mcus_y = height.div_ceil(8 * max_v);
        let components = specs
            .into_iter()
            .map(|(id, h, v, quant_slot)| {
                let stride_blocks = mcus_x * h;
                Component {
                    id,
                    h,
                    v,
                    quant_slot,
                    quant: None,
                    blocks_w: (width * h).div_ceil(8 * max_h),
                    blocks_h: (height * v).div_ceil(8 * max_v),
                    stride_blocks,
                    coefs: vec![0i16; stride_blocks * mcus_y * v * 64],
                    dc_pred: 0,
                }
            })
            .collect();
        self.frame = Some(Frame {
            width,
            height,
            progressive,
            components,
            max_h,
            max_v,
            mcus_x,
            mcus_y,
        });
        Ok(())
    }

    /// DHT, parsed like libjpeg's `get_dht`; the code itself is checked when a scan uses it.
    fn read_huffman_tables(&mut self, cursor: &mut Cursor) -> Result<()> {
        let mut length = i64::from(cursor.u16()?) - 2;
        while length > 16 {
            let index = cursor.u8()?;
            let mut counts = [0u8; 16];
            for count in &mut counts {
                *count = cursor.u8()?;
            }
            length -= 17;
            let total: i64 = counts.iter().map(|&c| i64::from(c)).sum();
            if total > 256 || total > length {
                return invalid("bad Huffman table");
            }
            let mut values = Vec::with_capacity(total as usize);
            for _ in 0..total {
                values.push(cursor.u8()?);
            }
            length -= total;
            let spec = Some(HuffSpec { counts, values });
            if index & 0x10 != 0 {
                let slot = (index - 0x10) as usize;
                *self
                    .ac_tables
                    .get_mut(slot)
                    .ok_or_else(|| JpegError::Invalid("bad DHT index".into()))? = spec;
            } else {
                *self
                    .dc_tables
                    .get_mut(index as usize)
                    .ok_or_else(|| JpegError::Invalid("bad DHT index".into()))? = spec;
            }
        }
        if length != 0 {
            return invalid("bad DHT length");
        }
        Ok(())
    }

    /// DQT, parsed like libjpeg's `get_dqt` (any nonzero precision nibble means 16-bit).
    fn read_quant_tables(&mut self, cursor: &mut Cursor) -> Result<()> {
        let mut length = i64::from(cursor.u16()?) - 2;
        while length > 0 {
            let header = cursor.u8()?;
            let wide = header >> 4 != 0;
            let slot = (header & 15) as usize;
            if slot > 3 {
                return invalid("bad DQT index");
            }
            let mut table = [0u16; 64];
            for &natural in &NATURAL_ORDER[..64] {
                table[natural] = if wide {
                    cursor.u16()?
                } else {
                    u16::from(cursor.u8()?)
                };
            }
            self.quant[slot] = Some(table);
            length -= if wide { 129 } else { 65 };
        }
        if length != 0 {
            return invalid("bad DQT length");
        }
        Ok(())
    }

    /// SOS, parsed like libjpeg's `get_sos`.
    fn read_scan_header(&mut self, cursor: &mut Cursor) -> Result<Scan> {
        let Some(frame) = self.frame.as_ref() else {
            return invalid("scan before frame header");
        };
        let length = cursor.u16()? as usize;
        let count = cursor.u8()? as usize;
        if length != 6 + 2 * count || !(1..=4).contains(&count) {
            return invalid("bad scan header length");
        }
        let mut scan = Scan {
            comps: Vec::with_capacity(count),
            dc_slots: Vec::with_capacity(count),
            ac_slots: Vec::with_capacity(count),
            ss: 0,
            se: 0,
            ah: 0,
            al: 0,
        };
        for _ in 0..count {
            let id = cursor.u8()?;
            let tables = cursor.u8()?;
            let index = frame
                .components
                .iter()
                .take(4)
                .enumerate()
                .position(|(i, c)| c.id == id && !scan.comps.contains(&i))
                .ok_or_else(|| JpegError::Invalid(format!("bad component {id} in scan")))?;
            scan.comps.push(index);
            scan.dc_slots.push((tables >> 4) as usize);
            scan.ac_slots.push((tables & 15) as usize);
        }
        scan.ss = cursor.u8()? as usize;
        scan.se = cursor.u8()? as usize;
        let approximation = cursor.u8()?;
        scan.ah = u32::from(approximation >> 4);
        scan.al = u32::from(approximation & 15);
        Ok(scan)
    }

    /// Validates a scan against the frame, builds its tables and decodes its data. Returns
    /// `true` when that scan completes the image (a sequential file whose first scan holds
    /// every component: libjpeg then outputs the image without buffering).
    fn decode_scan(&mut self, scan: &Scan) -> Result<bool> {
        let Some(frame) = self.frame.as_mut() else {
            return invalid("scan before frame header");
        };
        let count = scan.comps.len();
        let pass = if !frame.progressive {
            Pass::Sequential
        } else {
            let dc = scan.ss == 0;
            let bad = (dc && scan.se != 0)
                || (!dc && (scan.ss > scan.se || scan.se > 63 || count != 1))
                || (scan.ah != 0 && scan.al + 1 != scan.ah)
                || scan.al > 13;
            if bad {
                return invalid("bad progressive scan parameters");
            }
            match (dc, scan.ah != 0) {
                (true, false) => Pass::DcFirst,
                (true, true) => Pass::DcRefine,
                (false, false) => Pass::AcFirst,
                (false, true) => Pass::AcRefine,
            }
        };
        if count > 1 {
            let blocks: usize = scan
                .comps
                .iter()
                .map(|&c| frame.components[c].h * frame.components[c].v)
                .sum();
            if blocks > MAX_BLOCKS_IN_MCU {
                return invalid("too many blocks per MCU");
            }
        }
        let needs_dc = matches!(pass, Pass::Sequential | Pass::DcFirst);
        let needs_ac = matches!(pass, Pass::Sequential | Pass::AcFirst | Pass::AcRefine);
        // libjpeg-turbo's sequential decoder (not the progressive one) fills undefined slots
        // 0 and 1 with the standard tables, for Motion-JPEG frames that omit DHT.
        let standard = (pass == Pass::Sequential).then(standard_tables);
        let build = |specs: &[Option<HuffSpec>; 4], slot: usize, dc: bool| {
            let fallback = standard
                .as_ref()
                .and_then(|[dc0, dc1, ac0, ac1]| match (dc, slot) {
                    (true, 0) => Some(dc0),
                    (true, 1) => Some(dc1),
                    (false, 0) => Some(ac0),
                    (false, 1) => Some(ac1),
                    _ => None,
                });
            specs
                .get(slot)
                .and_then(Option::as_ref)
                .or(fallback)
                .ok_or_else(|| JpegError::Invalid("missing Huffman table".into()))?
                .build(dc)
        };
        let mut tables = Vec::with_capacity(count);
        for (i, &c) in scan.comps.iter().enumerate() {
            let dc = if needs_dc {
                Some(build(&self.dc_tables, scan.dc_slots[i], true)?)
            } else {
                None
            };
            let ac = if needs_ac {
                Some(build(&self.ac_tables, scan.ac_slots[i], false)?)
            } else {
                None
            };
            tables.push((dc, ac));
            let component = &mut frame.components[c];
            if component.quant.is_none() {
                component.quant = Some(
                    self.quant[component.quant_slot]
                        .ok_or_else(|| JpegError::Invalid("missing quantisation table".into()))?,
                );
            }
            component.dc_pred = 0;
        }
        self.scans += 1;
        self.pos = decode_scan_data(
            frame,
            scan,
            pass,
            &tables,
            self.restart_interval,
            self.data,
            self.pos,
        )?;
        Ok(pass == Pass::Sequential && self.scans == 1 && count == frame.components.len())
    }

    /// Inverse DCT, upsampling and colour conversion of the buffered coefficients.
    fn finish(self) -> Result<JpegImage> {
        let Some(frame) = self.frame else {
            return invalid("no frame header");
        };
        let (width, height) = (frame.width, frame.height);
        let planes: Vec<Vec<u8>> = frame
            .components
            .iter()
            .map(|c| upsample(&inverse_dct(c), c, &frame))
            .collect::<Result<_>>()?;
        let pixels = width * height;
        let (color, data) = match planes.len() {
            1 => (
                JpegColor::Gray,
                planes.into_iter().next().unwrap_or_default(),
            ),
            3 => {
                let transform = if self.jfif {
                    ColorTransform::YCbCr
                } else if let Some(t) = self.adobe_transform {
                    if t == 0 {
                        ColorTransform::None
                    } else {
                        ColorTransform::YCbCr
                    }
                } else {
                    let ids: Vec<u8> = frame.components.iter().map(|c| c.id).collect();
                    if ids == [b'R', b'G', b'B'] {
                        ColorTransform::None
                    } else {
                        ColorTransform::YCbCr
                    }
                };
                let mut out = vec![0u8; pixels * 3];
                match transform {
                    ColorTransform::None => {
                        for (i, px) in out.chunks_exact_mut(3).enumerate() {
                            px.copy_from_slice(&[planes[0][i], planes[1][i], planes[2][i]]);
                        }
                    }
                    ColorTransform::YCbCr => {
                        let tables = YccTables::new();
                        for (i, px) in out.chunks_exact_mut(3).enumerate() {
                            let rgb = tables.rgb(planes[0][i], planes[1][i], planes[2][i]);
                            px.copy_from_slice(&rgb);
                        }
                    }
                }
                (JpegColor::Rgb, out)
            }
            _ => {
                // libjpeg: Adobe transform 2 (or unknown) means YCCK, otherwise plain CMYK.
                let ycck = matches!(self.adobe_transform, Some(t) if t != 0);
                let mut out = vec![0u8; pixels * 4];
                let tables = YccTables::new();
                for (i, px) in out.chunks_exact_mut(4).enumerate() {
                    if ycck {
                        let [r, g, b] =
                            tables.rgb_unclamped(planes[0][i], planes[1][i], planes[2][i]);
                        px[0] = (255 - r).clamp(0, 255) as u8;
                        px[1] = (255 - g).clamp(0, 255) as u8;
                        px[2] = (255 - b).clamp(0, 255) as u8;
                    } else {
                        px[0] = planes[0][i];
                        px[1] = planes[1][i];
                        px[2] = planes[2][i];
                    }
                    px[3] = planes[3][i];
                }
                (JpegColor::Cmyk, out)
            }
        };
        Ok(JpegImage {
            width: width as u32,
            height: height as u32,
            color,
            data,
        })
    }
}

enum ColorTransform {
    None,
    YCbCr,
}

// ---------------------------------------------------------------------------------------------
// Scan decoding
// ---------------------------------------------------------------------------------------------

/// Decodes the entropy-coded data of one scan into the frame's coefficient buffers and returns
/// the position where the data ended (the next marker). `tables` holds the (DC, AC) tables of
/// each scan component, present when the pass needs them.
fn decode_scan_data(
    frame: &mut Frame,
    scan: &Scan,
    pass: Pass,
    tables: &[(Option<HuffTable>, Option<HuffTable>)],
    restart_interval: usize,
    data: &[u8],
    start: usize,
) -> Result<usize> {
    let mut reader = BitReader::new(data, start);
    let mut eobrun: u32 = 0;
    let dc: Vec<Option<&HuffTable>> = tables.iter().map(|t| t.0.as_ref()).collect();
    let ac: Vec<Option<&HuffTable>> = tables.iter().map(|t| t.1.as_ref()).collect();

    // Block coordinates of every MCU, in stream order.
    let single = scan.comps.len() == 1;
    let (mcus_w, mcus_h) = if single {
        let c = &frame.components[scan.comps[0]];
        (c.blocks_w, c.blocks_h)
    } else {
        (frame.mcus_x, frame.mcus_y)
    };
    let mut mcu_index = 0usize;
    let mut next_restart = 0u8;
    for my in 0..mcus_h {
        for mx in 0..mcus_w {
            if restart_interval > 0 && mcu_index > 0 && mcu_index.is_multiple_of(restart_interval) {
                reader.restart(&mut next_restart)?;
                eobrun = 0;
                for &c in &scan.comps {
                    frame.components[c].dc_pred = 0;
                }
            }
            mcu_index += 1;
            // Like libjpeg, once the segment has run dry the rest of it is left as it is
            // (DC refinement excepted, which would only OR in zero bits anyway).
            if reader.insufficient && pass != Pass::DcRefine {
                continue;
            }
            for (i, &c) in scan.comps.iter().enumerate() {
                let component = &mut frame.components[c];
                let (bh, bv) = if single {
                    (1, 1)
                } else {
                    (component.h, component.v)
                };
                for v in 0..bv {
                    for h in 0..bh {
                        let (bx, by) = if single {
                            (mx, my)
                        } else {
                            (mx * component.h + h, my * component.v + v)
                        };
                        let mut pred = component.dc_pred;
                        let block = component.block_mut(bx, by);
                        match pass {
                            Pass::Sequential => {
                                let (Some(dc), Some(ac)) = (dc[i], ac[i]) else {
                                    return invalid("missing Huffman table");
                                };
                                decode_block_sequential(&mut reader, dc, ac, &mut pred, block);
                            }
                            Pass::DcFirst => {
                                let Some(dc) = dc[i] else {
                                    return invalid("missing Huffman table");
                                };
                                let diff = {
                                    let s = u32::from(reader.decode(dc));
                                    reader.receive_extend(s)
                                };
                                pred = pred.wrapping_add(diff);
                                block[0] = (pred << scan.al) as i16;
                            }
                            Pass::DcRefine => {
                                if reader.bit() {
                                    block[0] |= 1 << scan.al;
                                }
                            }
                            Pass::AcFirst => {
                                let Some(ac) = ac[i] else {
                                    return invalid("missing Huffman table");
                                };
                                decode_ac_first(&mut reader, ac, scan, &mut eobrun, block);
                            }
                            Pass::AcRefine => {
                                let Some(ac) = ac[i] else {
                                    return invalid("missing Huffman table");
                                };
                                decode_ac_refine(&mut reader, ac, scan, &mut eobrun, block);
                            }
                        }
                        component.dc_pred = pred;
                    }
                }
            }
            if reader.starved {
                return Err(JpegError::Truncated);
            }
        }
    }
    Ok(reader.end_position())
}

fn decode_block_sequential(
    reader: &mut BitReader,
    dc: &HuffTable,
    ac: &HuffTable,
    pred: &mut i32,
    block: &mut [i16],
) {
    let s = u32::from(reader.decode(dc));
    *pred = pred.wrapping_add(reader.receive_extend(s));
    block[0] = *pred as i16;
    let mut k = 1usize;
    while k < 64 {
        let rs = reader.decode(ac);
        let run = (rs >> 4) as usize;
        let size = u32::from(rs & 15);
        if size != 0 {
            k += run;
            block[NATURAL_ORDER[k]] = reader.receive_extend(size) as i16;
        } else if run == 15 {
            k += 15;
        } else {
            break;
        }
        k += 1;
    }
}

fn decode_ac_first(
    reader: &mut BitReader,
    ac: &HuffTable,
    scan: &Scan,
    eobrun: &mut u32,
    block: &mut [i16],
) {
    if *eobrun > 0 {
        *eobrun -= 1;
        return;
    }
    let mut k = scan.ss;
    while k <= scan.se {
        let rs = reader.decode(ac);
        let run = u32::from(rs >> 4);
        let size = u32::from(rs & 15);
        if size != 0 {
            k += run as usize;
            let value = reader.receive_extend(size);
            block[NATURAL_ORDER[k]] = (value << scan.al) as i16;
        } else if run == 15 {
            k += 15;
        } else {
            *eobrun = 1 << run;
            if run != 0 {
                *eobrun += reader.bits(run) as u32;
            }
            *eobrun -= 1;
            break;
        }
        k += 1;
    }
}

fn decode_ac_refine(
    reader: &mut BitReader,
    ac: &HuffTable,
    scan: &Scan,
    eobrun: &mut u32,
    block: &mut [i16],
) {
    let p1: i16 = 1 << scan.al;
    let m1: i16 = -1 << scan.al;
    let mut k = scan.ss;
    // Refines a coefficient that is already nonzero by one correction bit.
    let refine = |reader: &mut BitReader, coef: &mut i16| {
        if reader.bit() && (*coef & p1) == 0 {
            *coef = if *coef >= 0 {
                coef.wrapping_add(p1)
            } else {
                coef.wrapping_add(m1)
            };
        }
    };
    if *eobrun == 0 {
        while k <= scan.se {
            let rs = reader.decode(ac);
            let mut run = i32::from(rs >> 4);
            let size = rs & 15;
            let mut value: i16 = 0;
            if size != 0 {
                value = if reader.bit() { p1 } else { m1 };
            } else if run != 15 {
                *eobrun = 1 << run;
                if run != 0 {
                    *eobrun += reader.bits(run as u32) as u32;
                }
                break;
            }
            // Skip `run` zero coefficients, refining the nonzero ones passed on the way.
            loop {
                let coef = &mut block[NATURAL_ORDER[k]];
                if *coef != 0 {
                    refine(reader, coef);
                } else {
                    run -= 1;
                    if run < 0 {
                        break;
                    }
                }
                k += 1;
                if k > scan.se {
                    break;
                }
            }
            if value != 0 {
                block[NATURAL_ORDER[k]] = value;
            }
            k += 1;
        }
    }
    if *eobrun > 0 {
        while k <= scan.se {
            let coef = &mut block[NATURAL_ORDER[k]];
            if *coef != 0 {
                refine(reader, coef);
            }
            k += 1;
        }
        *eobrun -= 1;
    }
}

// ---------------------------------------------------------------------------------------------
// Inverse DCT: libjpeg's "ISLOW" (Loeffler-Ligtenberg-Moschytz, 13-bit constants, 2 extra bits
// between passes) with the integer widths of libjpeg-turbo's x86 SIMD code (jidctint-sse2/avx2),
// which is what Pillow runs on x86-64. On valid data this equals the C version bit for bit; the
// widths only matter for corrupt data with out-of-range coefficients, where SIMD saturates and C
// wraps around.
// ---------------------------------------------------------------------------------------------

const CONST_BITS: u32 = 13;
const PASS1_BITS: u32 = 2;
const FIX_0_298631336: i64 = 2446;
const FIX_0_390180644: i64 = 3196;
const FIX_0_541196100: i64 = 4433;
const FIX_0_765366865: i64 = 6270;
const FIX_0_899976223: i64 = 7373;
const FIX_1_175875602: i64 = 9633;
const FIX_1_501321110: i64 = 12299;
const FIX_1_847759065: i64 = 15137;
const FIX_1_961570560: i64 = 16069;
const FIX_2_053119869: i64 = 16819;
const FIX_2_562915447: i64 = 20995;
const FIX_3_072711026: i64 = 25172;

/// One 1-D ISLOW pass over 8 samples, as the SIMD code computes it: 16-bit inputs; the sums
/// `in0 +- in4`, `in7 + in3` and `in5 + in1` wrap at 16 bits; products are exact and everything
/// after wraps at 32 bits (computed exactly here, then truncated, which is the same modulo 2^32);
/// each output is descaled by `shift` with rounding and saturated to 16 bits.
#[inline]
fn idct_1d(s: [i16; 8], shift: u32) -> [i16; 8] {
    let wide = i64::from;
    // Even part.
    let sum04 = wide(s[0].wrapping_add(s[4])) << CONST_BITS;
    let diff04 = wide(s[0].wrapping_sub(s[4])) << CONST_BITS;
    let (in2, in6) = (wide(s[2]), wide(s[6]));
    let tmp3 = in2 * (FIX_0_541196100 + FIX_0_765366865) + in6 * FIX_0_541196100;
    let tmp2 = in2 * FIX_0_541196100 + in6 * (FIX_0_541196100 - FIX_1_847759065);
    let (tmp10, tmp13) = (sum04 + tmp3, sum04 - tmp3);
    let (tmp11, tmp12) = (diff04 + tmp2, diff04 - tmp2);
    // Odd part.
    let (in1, in3, in5, in7) = (wide(s[1]), wide(s[3]), wide(s[5]), wide(s[7]));
    let sum73 = wide(s[7].wrapping_add(s[3]));
    let sum51 = wide(s[5].wrapping_add(s[1]));
    let z3 = sum73 * (FIX_1_175875602 - FIX_1_961570560) + sum51 * FIX_1_175875602;
    let z4 = sum73 * FIX_1_175875602 + sum51 * (FIX_1_175875602 - FIX_0_390180644);
    let odd0 = in7 * (FIX_0_298631336 - FIX_0_899976223) - in1 * FIX_0_899976223 + z3;
    let odd1 = in5 * (FIX_2_053119869 - FIX_2_562915447) - in3 * FIX_2_562915447 + z4;
    let odd2 = in3 * (FIX_3_072711026 - FIX_2_562915447) - in5 * FIX_2_562915447 + z3;
    let odd3 = in1 * (FIX_1_501321110 - FIX_0_899976223) - in7 * FIX_0_899976223 + z4;
    let outputs = [
        tmp10 + odd3,
        tmp11 + odd2,
        tmp12 + odd1,
        tmp13 + odd0,
        tmp13 - odd0,
        tmp12 - odd1,
        tmp11 - odd2,
        tmp10 - odd3,
    ];
    outputs.map(|x| {
        let descaled = (x as i32).wrapping_add(1 << (shift - 1)) >> shift;
        descaled.clamp(i32::from(i16::MIN), i32::from(i16::MAX)) as i16
    })
}

/// Dequantises and inverse-transforms one block into 8x8 samples at `out[offset..]`.
fn idct_block(coefs: &[i16], quant: &[u16; 64], out: &mut [u8], offset: usize, stride: usize) {
    // 16-bit multiply keeping the low half (`pmullw`).
    let dequantized: [i16; 64] =
        std::array::from_fn(|i| (i32::from(coefs[i]) * i32::from(quant[i])) as i16);
    let mut workspace = [0i16; 64];
    if coefs[8..].iter().all(|&c| c == 0) {
        // Only the first coefficient row is nonzero: every column is constant.
        for row in workspace.chunks_exact_mut(8) {
            for (w, &d) in row.iter_mut().zip(&dequantized[..8]) {
                *w = d.wrapping_shl(PASS1_BITS);
            }
        }
    } else {
        for col in 0..8 {
            let column = idct_1d(
                std::array::from_fn(|row| dequantized[row * 8 + col]),
                CONST_BITS - PASS1_BITS,
            );
            for (row, value) in column.into_iter().enumerate() {
                workspace[row * 8 + col] = value;
            }
        }
    }
    for (row, samples) in workspace.chunks_exact(8).enumerate() {
        let values = idct_1d(
            std::array::from_fn(|i| samples[i]),
            CONST_BITS + PASS1_BITS + 3,
        );
        let dst = &mut out[offset + row * stride..offset + row * stride + 8];
        for (d, v) in dst.iter_mut().zip(values) {
            // Saturate to a signed byte, then re-centre on 128.
            *d = (i32::from(v).clamp(-128, 127) + 128) as u8;
        }
    }
}

/// Sample plane of one component at its own (downsampled) resolution, padded to whole blocks.
struct Plane {
    data: Vec<u8>,
    stride: usize,
}

fn inverse_dct(component: &Component) -> Plane {
    let stride = component.blocks_w * 8;
    let mut data = vec![0u8; stride * component.blocks_h * 8];
    // A component that no scan touched decodes as mid-grey, like libjpeg's zeroed buffers.
    let quant = component.quant.unwrap_or([0u16; 64]);
    for by in 0..component.blocks_h {
        for bx in 0..component.blocks_w {
            let start = (by * component.stride_blocks + bx) * 64;
            let coefs = &component.coefs[start..start + 64];
            idct_block(coefs, &quant, &mut data, by * 8 * stride + bx * 8, stride);
        }
    }
    Plane { data, stride }
}

// ---------------------------------------------------------------------------------------------
// Upsampling (libjpeg-turbo jdsample.c choices with do_fancy_upsampling = TRUE)
// ---------------------------------------------------------------------------------------------

/// Brings one component to full resolution (`width x height`, tightly packed). Rows and
/// columns outside the component's real samples are never read: libjpeg replicates the last
/// real row below the image and special-cases the first and last columns.
fn upsample(plane: &Plane, component: &Component, frame: &Frame) -> Result<Vec<u8>> {
    let (width, height) = (frame.width, frame.height);
    if !frame.max_h.is_multiple_of(component.h) || !frame.max_v.is_multiple_of(component.v) {
        return Err(JpegError::Unsupported("fractional sampling factors".into()));
    }
    let h_expand = frame.max_h / component.h;
    let v_expand = frame.max_v / component.v;
    // The component's real extent (libjpeg's downsampled_width/height).
    let in_w = (width * component.h).div_ceil(frame.max_h);
    let in_h = (height * component.v).div_ceil(frame.max_v);
    let row = |y: usize| &plane.data[y * plane.stride..y * plane.stride + in_w];
    let mut out = vec![0u8; width * height];
    let mut line = vec![0u8; in_w * h_expand];
    for y in 0..height {
        let src_y = y / v_expand;
        match (h_expand, v_expand) {
            (1, 1) => line.copy_from_slice(row(y)),
            (2, 1) if in_w > 2 => h2v1_fancy(row(src_y), &mut line),
            (1, 2) => {
                let (far, bias) = if y.is_multiple_of(2) {
                    (src_y.saturating_sub(1), 1)
                } else {
                    ((src_y + 1).min(in_h - 1), 2)
                };
                for ((dst, &near), &far) in line.iter_mut().zip(row(src_y)).zip(row(far)) {
                    *dst = ((3 * u32::from(near) + u32::from(far) + bias) >> 2) as u8;
                }
            }
            (2, 2) if in_w > 2 => {
                let far = if y.is_multiple_of(2) {
                    src_y.saturating_sub(1)
                } else {
                    (src_y + 1).min(in_h - 1)
                };
                h2v2_fancy(row(src_y), row(far), &mut line);
            }
            _ => {
                for (x, dst) in line.iter_mut().enumerate() {
                    *dst = row(src_y)[x / h_expand];
                }
            }
        }
        out[y * width..(y + 1) * width].copy_from_slice(&line[..width]);
    }
    Ok(out)
}

/// Horizontal 2x triangle filter: each output is 3/4 of the nearer input plus 1/4 of the
/// farther one, with alternating rounding biases (libjpeg `h2v1_fancy_upsample`).
fn h2v1_fancy(input: &[u8], out: &mut [u8]) {
    let n = input.len();
    let at = |i: usize| u32::from(input[i]);
    out[0] = input[0];
    out[1] = ((at(0) * 3 + at(1) + 2) >> 2) as u8;
    for i in 1..n - 1 {
        let centre = at(i) * 3;
        out[2 * i] = ((centre + at(i - 1) + 1) >> 2) as u8;
        out[2 * i + 1] = ((centre + at(i + 1) + 2) >> 2) as u8;
    }
    out[2 * n - 2] = ((at(n - 1) * 3 + at(n - 2) + 1) >> 2) as u8;
    out[2 * n - 1] = input[n - 1];
}

/// 2x2 triangle filter for one output row: vertical 3:1 mix of the nearer and farther input
/// rows, then horizontal 3:1 mix with biases 8 and 7 (libjpeg `h2v2_fancy_upsample`).
fn h2v2_fancy(near: &[u8], far: &[u8], out: &mut [u8]) {
    let n = near.len();
    let col = |i: usize| u32::from(near[i]) * 3 + u32::from(far[i]);
    let mut this = col(0);
    let mut next = col(1);
    out[0] = ((this * 4 + 8) >> 4) as u8;
    out[1] = ((this * 3 + next + 7) >> 4) as u8;
    let mut last = this;
    this = next;
    for i in 1..n - 1 {
        next = col(i + 1);
        out[2 * i] = ((this * 3 + last + 8) >> 4) as u8;
        out[2 * i + 1] = ((this * 3 + next + 7) >> 4) as u8;
        last = this;
        this = next;
    }
    out[2 * n - 2] = ((this * 3 + last + 8) >> 4) as u8;
    out[2 * n - 1] = ((this * 4 + 7) >> 4) as u8;
}

// ---------------------------------------------------------------------------------------------
// Colour conversion (libjpeg jdcolor.c, 16-bit fixed point tables)
// ---------------------------------------------------------------------------------------------

struct YccTables {
    cr_r: [i32; 256],
    cb_b: [i32; 256],
    cr_g: [i32; 256],
    cb_g: [i32; 256],
}

impl YccTables {
    fn new() -> Self {
        const SCALEBITS: u32 = 16;
        const ONE_HALF: i32 = 1 << (SCALEBITS - 1);
        let fix = |x: f64| (x * f64::from(1u32 << SCALEBITS) + 0.5) as i32;
        let mut tables = YccTables {
            cr_r: [0; 256],
            cb_b: [0; 256],
            cr_g: [0; 256],
            cb_g: [0; 256],
        };
        for i in 0..256 {
            let x = i as i32 - 128;
            tables.cr_r[i] = (fix(1.40200) * x + ONE_HALF) >> SCALEBITS;
            tables.cb_b[i] = (fix(1.77200) * x + ONE_HALF) >> SCALEBITS;
            tables.cr_g[i] = -fix(0.71414) * x;
            tables.cb_g[i] = -fix(0.34414) * x + ONE_HALF;
        }
        tables
    }

    #[inline]
    fn rgb_unclamped(&self, y: u8, cb: u8, cr: u8) -> [i32; 3] {
        let (y, cb, cr) = (i32::from(y), cb as usize, cr as usize);
        [
            y + self.cr_r[cr],
            y + ((self.cb_g[cb] + self.cr_g[cr]) >> 16),
            y + self.cb_b[cb],
        ]
    }

    #[inline]
    fn rgb(&self, y: u8, cb: u8, cr: u8) -> [u8; 3] {
        self.rgb_unclamped(y, cb, cr).map(|v| v.clamp(0, 255) as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standard(index: usize) -> HuffTable {
        let spec = &standard_tables()[index];
        HuffTable::new(&spec.counts, &spec.values).expect("standard tables are valid")
    }

    #[test]
    fn huffman_codes_short_and_long() {
        // DC luminance: "111111110" (9 bits, slow path) = 11, "00" = 0, "010" = 1, then "11"
        // padding; the 0xFF byte is followed by a stuffed 0x00.
        let data = [0xFF, 0x00, 0x0B, 0xFF, 0xD9];
        let table = standard(0);
        let mut reader = BitReader::new(&data, 0);
        assert_eq!(reader.decode(&table), 11);
        assert_eq!(reader.decode(&table), 0);
        assert_eq!(reader.decode(&table), 1);
        assert!(!reader.insufficient && !reader.starved);
        // Reading past the EOI marker yields zero bits and marks the segment as exhausted.
        reader.bits(16);
        assert!(reader.insufficient);
        assert_eq!(reader.end_position(), 3);
    }

    #[test]
    fn reading_past_the_end_of_input_starves() {
        let data = [0x12];
        let mut reader = BitReader::new(&data, 0);
        reader.bits(4);
        assert!(
            reader.starved,
            "libjpeg would suspend waiting for more data"
        );
    }

    #[test]
    fn overfull_huffman_table_is_rejected() {
        let mut counts = [0u8; 16];
        counts[0] = 3; // three 1-bit codes cannot exist
        assert!(HuffTable::new(&counts, &[0, 1, 2]).is_err());
        // A DC table may only hold magnitude categories 0..=15.
        let dc = HuffSpec {
            counts: [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            values: vec![16],
        };
        assert!(dc.build(true).is_err());
        assert!(dc.build(false).is_ok());
    }

    #[test]
    fn idct_of_dc_only_block_is_flat() {
        let mut coefs = [0i16; 64];
        coefs[0] = 8;
        let quant = [1u16; 64];
        let mut out = [0u8; 64];
        idct_block(&coefs, &quant, &mut out, 0, 8);
        assert!(out.iter().all(|&v| v == 129), "{out:?}");
    }

    #[test]
    fn idct_wraps_like_libjpeg_turbo_simd() {
        // 2000 * 16 = 32000 fits 16 bits, but the x4 of pass 1 wraps to -3072 as in `psllw`.
        let mut coefs = [0i16; 64];
        coefs[0] = 2000;
        let quant = [16u16; 64];
        let mut out = [0u8; 64];
        idct_block(&coefs, &quant, &mut out, 0, 8);
        assert!(out.iter().all(|&v| v == 32), "{out:?}");
    }

    #[test]
    fn fancy_upsampling_filters() {
        let mut out = [0u8; 6];
        h2v1_fancy(&[0, 100, 200], &mut out);
        assert_eq!(out, [0, 25, 75, 125, 175, 200]);
        h2v2_fancy(&[0, 100, 200], &[0, 100, 200], &mut out);
        assert_eq!(out, [0, 25, 75, 125, 175, 200]);
    }

    #[test]
    fn ycc_to_rgb_tables() {
        let tables = YccTables::new();
        assert_eq!(tables.rgb(128, 128, 128), [128, 128, 128]);
        assert_eq!(tables.rgb(0, 255, 128), [0, 0, 225]);
        // B = 255 + floor((116130 * -128 + 32768) / 65536) = 28.
        assert_eq!(tables.rgb(255, 0, 0), [76, 255, 28]);
    }

    #[test]
    fn header_errors() {
        assert!(matches!(
            decode(&[0xFF, 0xD8], u64::MAX),
            Err(JpegError::Truncated)
        ));
        assert!(matches!(
            decode(&[0xFF, 0xD8, 0xFF, 0xD9], u64::MAX),
            Err(JpegError::Invalid(_))
        ));
        assert!(matches!(
            decode(b"GIF89a", u64::MAX),
            Err(JpegError::Invalid(_))
        ));
        // SOF0 of a 0x0 image.
        let empty = [0xFF, 0xD8, 0xFF, 0xC0, 0, 11, 8, 0, 0, 0, 0, 1, 1, 0x11, 0];
        assert!(matches!(
            decode(&empty, u64::MAX),
            Err(JpegError::Invalid(_))
        ));
        // A 12-bit frame.
        let deep = [0xFF, 0xD8, 0xFF, 0xC1, 0, 11, 12, 0, 8, 0, 8, 1, 1, 0x11, 0];
        assert!(matches!(
            decode(&deep, u64::MAX),
            Err(JpegError::Unsupported(_))
        ));
        // Over the pixel limit.
        let big = [
            0xFF, 0xD8, 0xFF, 0xC0, 0, 11, 8, 0, 100, 0, 100, 1, 1, 0x11, 0,
        ];
        assert!(matches!(
            decode(&big, 9_999),
            Err(JpegError::TooLarge { .. })
        ));
    }
}
