//! The int16 forms shared by the NF4 decode kernel (`decode`) and its AVX2 inner loops
//! (`simd_int`): the scaled codebook's factor and the aligned 16-value input chunk.

/// The int16 codebook is `round(NF4_CODE * CODE_SCALE)` (see `quant::decode`'s module comment).
pub(crate) const CODE_SCALE: f64 = 14640.0;

/// 16 int16 inputs in kernel order, aligned for 32-byte loads.
#[derive(Copy, Clone, Debug, Default, PartialEq)]
#[repr(C, align(32))]
pub(crate) struct Chunk(pub(crate) [i16; 16]);
