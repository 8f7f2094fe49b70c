//! `loraplex::agreement` on the tiny fixture model: a model agrees fully with its own greedy
//! answers, a changed reference token is counted where it is, and the NF4 model's numbers are
//! consistent with each other.

mod common;

use candle_core::Device;
use common::*;
use loraplex::agreement::{agreement, forced_choices, greedy_answers};
use loraplex::model::{self, LoadedModel, Nf4Settings};

fn load() -> LoadedModel {
    model::load_path(&tiny_model(), &Device::Cpu).unwrap()
}

fn prompts() -> Vec<Vec<u32>> {
    vec![vec![1, 5, 9, 13], vec![2, 40, 7], vec![3, 3, 3, 3, 3, 60]]
}

#[test]
fn a_model_agrees_with_its_own_greedy_answers() {
    let m = load();
    let prompts = prompts();
    let reference = greedy_answers(&m, &prompts, 12).unwrap();
    assert!(reference.iter().all(|a| a.len() == 12));
    let a = agreement(&m, &prompts, &reference).unwrap();
    assert_eq!(a.free, 1.0);
    assert_eq!(a.forced, 1.0);
    assert_eq!(a.first, 3);
    assert_eq!(a.mean_prefix, 12.0);
    assert_eq!(a.answers, 3);
    // Teacher forcing on the model's own answer reproduces it.
    assert_eq!(
        forced_choices(&m, &prompts[0], &reference[0]).unwrap(),
        reference[0]
    );
}

#[test]
fn a_changed_reference_token_is_counted_where_it_is() {
    let m = load();
    let prompts = prompts();
    let mut reference = greedy_answers(&m, &prompts, 12).unwrap();
    let vocab = m.llama.cfg.vocab_size as u32;
    reference[1][4] = (reference[1][4] + 1) % vocab;
    let a = agreement(&m, &prompts, &reference).unwrap();
    // The model's own answer differs from the changed reference at exactly one position.
    assert_eq!(a.free, 35.0 / 36.0);
    assert_eq!(a.mean_prefix, (12.0 + 4.0 + 12.0) / 3.0);
    assert_eq!(a.first, 3);
    // Teacher-forced, position 4 is missed; later positions see the changed context.
    assert!(a.forced < 1.0, "{a:?}");
}

#[test]
fn nf4_agreement_is_consistent_and_bad_input_is_refused() {
    let f32_model = load();
    let mut nf4 = load();
    nf4.quantize(Some(Nf4Settings::new(false))).unwrap();
    let prompts = prompts();
    let reference = greedy_answers(&f32_model, &prompts, 16).unwrap();
    let a = agreement(&nf4, &prompts, &reference).unwrap();
    assert!((0.0..=1.0).contains(&a.free) && (0.0..=1.0).contains(&a.forced));
    // Tokens before the first difference are equal positions, so the prefix bounds `free`.
    assert!(a.mean_prefix * 3.0 <= a.free * 48.0 + 1e-9, "{a:?}");
    assert!(agreement(&nf4, &prompts, &reference[..2]).is_err());
    assert!(forced_choices(&nf4, &prompts[0], &[]).is_err());
}
