//! Stored element types and their conversion to f32, shared by the safetensors and PyTorch readers.

/// Element types we can convert to f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ElemType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U64,
    U32,
    U16,
    U8,
    Bool,
}

impl ElemType {
    pub(super) fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 | Self::U64 => 8,
            Self::F32 | Self::I32 | Self::U32 => 4,
            Self::F16 | Self::BF16 | Self::I16 | Self::U16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    pub(super) fn from_safetensors(name: &str) -> Option<Self> {
        Some(match name {
            "F64" => Self::F64,
            "F32" => Self::F32,
            "F16" => Self::F16,
            "BF16" => Self::BF16,
            "I64" => Self::I64,
            "I32" => Self::I32,
            "I16" => Self::I16,
            "I8" => Self::I8,
            "U64" => Self::U64,
            "U32" => Self::U32,
            "U16" => Self::U16,
            "U8" => Self::U8,
            "BOOL" => Self::Bool,
            _ => return None,
        })
    }

    pub(super) fn from_torch_storage(class: &str) -> Option<Self> {
        Some(match class {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }
}

/// Converts packed elements to f32 (integers and f64 are rounded to the nearest f32).
pub(super) fn decode_elements(bytes: &[u8], elem: ElemType, big_endian: bool) -> Vec<f32> {
    fn each<const N: usize>(
        bytes: &[u8],
        big_endian: bool,
        f: impl Fn([u8; N]) -> f32,
    ) -> Vec<f32> {
        bytes
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                if big_endian {
                    a.reverse();
                }
                f(a)
            })
            .collect()
    }
    let be = big_endian;
    match elem {
        ElemType::F64 => each(bytes, be, |a| f64::from_le_bytes(a) as f32),
        ElemType::F32 => each(bytes, be, f32::from_le_bytes),
        ElemType::F16 => each(bytes, be, |a| half::f16::from_le_bytes(a).to_f32()),
        ElemType::BF16 => each(bytes, be, |a| half::bf16::from_le_bytes(a).to_f32()),
        ElemType::I64 => each(bytes, be, |a| i64::from_le_bytes(a) as f32),
        ElemType::I32 => each(bytes, be, |a| i32::from_le_bytes(a) as f32),
        ElemType::I16 => each(bytes, be, |a| f32::from(i16::from_le_bytes(a))),
        ElemType::I8 => each(bytes, be, |a| f32::from(i8::from_le_bytes(a))),
        ElemType::U64 => each(bytes, be, |a| u64::from_le_bytes(a) as f32),
        ElemType::U32 => each(bytes, be, |a| u32::from_le_bytes(a) as f32),
        ElemType::U16 => each(bytes, be, |a| f32::from(u16::from_le_bytes(a))),
        ElemType::U8 => each(bytes, be, |a: [u8; 1]| f32::from(a[0])),
        ElemType::Bool => each(bytes, be, |a: [u8; 1]| if a[0] != 0 { 1.0 } else { 0.0 }),
    }
}
