//! SentencePiece vocabularies (GGUF `tokenizer.ggml.model = "llama"`) as a Hugging Face
//! tokenizer.
//!
//! SentencePiece's BPE (and llama.cpp's `llama` tokenizer) splits the text into characters and then
//! keeps merging the adjacent pair whose concatenation is the vocabulary piece with the highest
//! score, leftmost first on ties; a character that is no piece becomes its UTF-8 bytes (`<0xNN>`
//! pieces, "byte fallback"). The same thing in Hugging Face terms, as `transformers`'
//! `LlamaConverter` builds it:
//!
//! * model: BPE with byte fallback, whose merges are every split of a piece into two pieces,
//!   ranked by the score of the piece they make (so the best-scoring merge applies first);
//! * normalizer: `Prepend("▁")` when the model adds a dummy prefix (`add_space_prefix`), then
//!   `Replace(" ", "▁")`; no pre-tokenizer (the whole text is one word, as in SentencePiece);
//! * decoder: `Replace("▁", " ")`, `ByteFallback`, `Fuse`, and `Strip` of the one leading space
//!   the dummy prefix added.
//!
//! This module knows nothing of GGUF: the caller hands it the pieces, their scores and which of
//! them are ordinary pieces that merges may produce.

use anyhow::{anyhow, bail, Result};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::{DecoderWrapper, NormalizerWrapper, Tokenizer};

/// SentencePiece's word-boundary mark: a space in the text is this character in the pieces.
pub const SPACE_MARK: &str = "\u{2581}";

/// A SentencePiece vocabulary.
pub struct SentencePiece<'a> {
    /// The pieces, indexed by id.
    pub pieces: &'a [&'a str],
    /// Each piece's score (higher merges first).
    pub scores: &'a [f32],
    /// Whether each piece is an ordinary piece, the only kind merges make or take part in
    /// (control, unknown, byte, unused and user-defined pieces are not).
    pub normal: &'a [bool],
    /// Piece string → id, one id per string.
    pub vocab: &'a Vocab,
    /// The piece text maps to when not even byte fallback can spell it.
    pub unk: Option<&'a str>,
    /// Whether a space is put in front of the text (SentencePiece's `add_dummy_prefix`).
    pub add_space_prefix: bool,
}

/// The merge rules equivalent to merging by score: every way to split an ordinary piece into two
/// ordinary pieces, best-scoring resulting piece first (ties: lower piece id, then lower ids of
/// the parts).
pub fn merges(spm: &SentencePiece) -> Result<Vec<(String, String)>> {
    check_lengths(spm)?;
    let normal_id = |text: &str| -> Option<u32> {
        spm.vocab
            .get(text)
            .copied()
            .filter(|&id| spm.normal[id as usize])
    };
    let mut ranked: Vec<(f32, u32, u32, u32)> = Vec::new();
    for (id, piece) in spm.pieces.iter().enumerate() {
        // A repeated string merges into the id the lookup gives (the last one).
        let Some(id) = normal_id(piece).filter(|&found| found as usize == id) else {
            continue;
        };
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(l), Some(r)) = (normal_id(left), normal_id(right)) {
                ranked.push((spm.scores[id as usize], id, l, r));
            }
        }
    }
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(&b.2))
            .then(a.3.cmp(&b.3))
    });
    Ok(ranked
        .into_iter()
        .map(|(_, _, l, r)| {
            (
                spm.pieces[l as usize].to_string(),
                spm.pieces[r as usize].to_string(),
            )
        })
        .collect())
}

/// The tokenizer (model, normalizer, decoder) that splits text as SentencePiece does; added
/// tokens and post-processing are the caller's.
pub fn tokenizer(spm: &SentencePiece) -> Result<Tokenizer> {
    let merges = merges(spm)?;
    let mut builder = BPE::builder()
        .vocab_and_merges(spm.vocab.clone(), merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = spm.unk {
        builder = builder.unk_token(unk.to_string());
    }
    let bpe = builder
        .build()
        .map_err(|e| anyhow!("the SentencePiece vocabulary does not form a BPE model: {e}"))?;

    let replace = |from: &str, to: &str| {
        Replace::new(from, to).map_err(|e| anyhow!("cannot build Replace({from:?}, {to:?}): {e}"))
    };
    let mut normalizers = Vec::new();
    if spm.add_space_prefix {
        normalizers.push(NormalizerWrapper::Prepend(Prepend::new(
            SPACE_MARK.to_string(),
        )));
    }
    normalizers.push(NormalizerWrapper::Replace(replace(" ", SPACE_MARK)?));

    let mut decoders = vec![
        DecoderWrapper::Replace(replace(SPACE_MARK, " ")?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if spm.add_space_prefix {
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }

    let mut tok = Tokenizer::new(bpe);
    tok.with_normalizer(Some(NormalizerWrapper::Sequence(NormalizerSequence::new(
        normalizers,
    ))))
    .map_err(|e| anyhow!("cannot set the normalizer: {e}"))?;
    tok.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(
        decoders,
    ))));
    Ok(tok)
}

fn check_lengths(spm: &SentencePiece) -> Result<()> {
    let n = spm.pieces.len();
    if spm.scores.len() != n || spm.normal.len() != n {
        bail!(
            "{n} pieces but {} scores and {} piece types",
            spm.scores.len(),
            spm.normal.len()
        );
    }
    if let Some((text, id)) = spm.vocab.iter().find(|(_, &id)| id as usize >= n) {
        bail!("vocabulary entry {text:?} has id {id}, outside the {n} pieces");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vocabulary from `(piece, score, normal)` rows, ids in row order.
    struct Rows {
        pieces: Vec<&'static str>,
        scores: Vec<f32>,
        normal: Vec<bool>,
        vocab: Vocab,
    }

    impl Rows {
        fn new(rows: &[(&'static str, f32, bool)]) -> Self {
            let pieces: Vec<&str> = rows.iter().map(|r| r.0).collect();
            let mut vocab = Vocab::default();
            for (id, p) in pieces.iter().enumerate() {
                vocab.insert(p.to_string(), id as u32);
            }
            Self {
                scores: rows.iter().map(|r| r.1).collect(),
                normal: rows.iter().map(|r| r.2).collect(),
                pieces,
                vocab,
            }
        }

        fn spm(&self, add_space_prefix: bool) -> SentencePiece<'_> {
            SentencePiece {
                pieces: &self.pieces,
                scores: &self.scores,
                normal: &self.normal,
                vocab: &self.vocab,
                unk: Some("<unk>"),
                add_space_prefix,
            }
        }
    }

    fn build(rows: &[(&'static str, f32, bool)], prefix: bool) -> Result<Tokenizer> {
        tokenizer(&Rows::new(rows).spm(prefix))
    }

    fn rows() -> Vec<(&'static str, f32, bool)> {
        let mut rows = vec![("<unk>", 0.0, false), ("<s>", 0.0, false)];
        // Merges by score: "bc" beats "ab", so "abc" is "a" + "bc" although "ab" is further left.
        rows.extend([
            ("bc", -1.0, true),
            ("ab", -2.0, true),
            ("▁a", -3.0, true),
            ("▁abc", -4.0, true),
            ("a", -10.0, true),
            ("b", -11.0, true),
            ("c", -12.0, true),
            ("▁", -13.0, true),
        ]);
        rows.push(("<0xC3>", 0.0, false));
        rows.push(("<0xA9>", 0.0, false));
        rows
    }

    fn ids(tok: &Tokenizer, text: &str) -> Vec<u32> {
        tok.encode(text, false).unwrap().get_ids().to_vec()
    }

    #[test]
    fn merges_follow_the_scores_of_the_pieces_they_make() {
        let rows = Rows::new(&rows());
        let spm = rows.spm(true);
        let got = merges(&spm).unwrap();
        let want: Vec<(String, String)> = [("b", "c"), ("a", "b"), ("▁", "a"), ("▁a", "bc")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        // "▁abc" splits three ways; only "▁a" + "bc" has two pieces for halves.
        assert_eq!(got, want);
    }

    #[test]
    fn encodes_by_score_with_byte_fallback_and_a_dummy_prefix() {
        let tok = build(&rows(), true).unwrap();
        // "▁abc": ▁ a b c → "b c" first (best score) → ▁ a bc → "▁ a" → ▁a bc → "▁abc".
        assert_eq!(ids(&tok, "abc"), vec![5]);
        // " cab": ▁ ▁ c a b → "ab" → ▁ ▁ c ab; no "▁▁", "▁c" or "cab".
        assert_eq!(ids(&tok, " cab"), vec![9, 9, 8, 3]);
        // "é" is no piece: its UTF-8 bytes; "x" has no byte piece either: <unk>.
        assert_eq!(ids(&tok, "é"), vec![9, 10, 11]);
        assert_eq!(ids(&tok, "ax"), vec![4, 0]);
        assert_eq!(ids(&tok, ""), Vec::<u32>::new());

        let decode = |ids: &[u32]| tok.decode(ids, false).unwrap();
        assert_eq!(decode(&[5]), "abc");
        assert_eq!(decode(&[9, 9, 8, 3]), " cab");
        assert_eq!(decode(&[9, 10, 11]), "é");
        assert_eq!(decode(&[10]), "\u{FFFD}", "half a character");
    }

    #[test]
    fn without_the_dummy_prefix_nothing_is_prepended_or_stripped() {
        let tok = build(&rows(), false).unwrap();
        assert_eq!(ids(&tok, "abc"), vec![6, 2]);
        assert_eq!(ids(&tok, " abc"), vec![5]);
        assert_eq!(tok.decode(&[5], false).unwrap(), " abc");
    }

    #[test]
    fn mismatched_lengths_are_refused() {
        let pieces = ["a", "b"];
        let vocab = Vocab::default();
        let err = merges(&SentencePiece {
            pieces: &pieces,
            scores: &[0.0],
            normal: &[true, true],
            vocab: &vocab,
            unk: None,
            add_space_prefix: true,
        })
        .unwrap_err();
        assert!(err.to_string().contains("2 pieces but 1 scores"), "{err}");
    }
}
