//! Reading base weights: HF safetensors folders (single file or sharded with an index) and GGUF
//! files (dequantized to f32, llama.cpp's Q/K row permutation undone, renamed to HF names).

use super::config::LlamaConfig;
use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The safetensors files of an HF folder: the shards an index names, else `model.safetensors`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: no `weight_map` object", index.display()))?;
        let files: BTreeSet<&str> = map.values().filter_map(|f| f.as_str()).collect();
        if files.is_empty() {
            bail!("{}: `weight_map` names no files", index.display());
        }
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    bail!(
        "{}: no model.safetensors or model.safetensors.index.json",
        dir.display()
    )
}

/// Loads every tensor of the given safetensors files, refusing a name that appears twice.
pub fn load_safetensors(files: &[PathBuf], device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut all = HashMap::new();
    for f in files {
        if !f.is_file() {
            bail!("weights file {} not found", f.display());
        }
        let part = candle_core::safetensors::load(f, device).with_context(|| {
            format!(
                "cannot read safetensors file {} (corrupt or truncated?)",
                f.display()
            )
        })?;
        for (k, t) in part {
            if all.insert(k.clone(), t).is_some() {
                bail!("tensor `{k}` appears in more than one shard");
            }
        }
    }
    Ok(all)
}

/// Undoes llama.cpp's `permute` of Q/K rows (`[heads, 2, d/2]` → `[heads, d/2, 2]`), giving
/// the HF row order that rotate-half RoPE and PEFT adapters expect.
pub fn unpermute_qk(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / heads;
    w.reshape((heads, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// The inverse of `unpermute_qk`: what llama.cpp's converter writes.
pub fn permute_qk(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / heads;
    w.reshape((heads, 2, hd / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// The HF name of a GGUF tensor, or `None` for a name loraplex does not know.
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, name) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = name.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// A GGUF file's metadata and tensors, dequantized to f32 under HF names with Q/K rows in HF
/// order. Returns the parsed config too.
pub fn load_gguf(
    path: &Path,
    device: &Device,
) -> Result<(gguf_file::Content, LlamaConfig, HashMap<String, Tensor>)> {
    let mut file = std::fs::File::open(path)
        .with_context(|| format!("cannot open GGUF file {}", path.display()))?;
    let content = gguf_file::Content::read(&mut file)
        .with_context(|| format!("{} is not a readable GGUF file", path.display()))?;
    let embd = content
        .tensor_infos
        .get("token_embd.weight")
        .with_context(|| format!("{}: no token_embd.weight tensor", path.display()))?;
    let vocab = embd.shape.dims()[0];
    let tied = !content.tensor_infos.contains_key("output.weight");
    let cfg = LlamaConfig::from_gguf(&content, vocab, tied)
        .with_context(|| format!("in {}", path.display()))?;
    let mut map = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        if name == "rope_freqs.weight" {
            bail!(
                "{}: per-dimension rope frequency factors (rope_freqs, Llama 3.1 style) are not \
                 supported in GGUF files; load the HF folder instead",
                path.display()
            );
        }
        let hf = hf_name(name)
            .with_context(|| format!("{}: unknown GGUF tensor `{name}`", path.display()))?;
        let q = content
            .tensor(&mut file, name, device)
            .with_context(|| format!("{}: cannot read tensor `{name}`", path.display()))?;
        let mut t = q.dequantize(device).with_context(|| {
            format!(
                "{}: cannot dequantize `{name}` ({:?})",
                path.display(),
                q.dtype()
            )
        })?;
        if name.ends_with("attn_q.weight") {
            t = unpermute_qk(&t, cfg.num_attention_heads)?;
        } else if name.ends_with("attn_k.weight") {
            t = unpermute_qk(&t, cfg.num_key_value_heads)?;
        }
        map.insert(hf, t);
    }
    Ok((content, cfg, map))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_round_trip_and_layout() {
        let dev = Device::Cpu;
        // 2 heads of dim 4, 3 columns: row r holds value r in every column.
        let w = Tensor::arange(0f32, 8.0, &dev)
            .unwrap()
            .reshape((8, 1))
            .unwrap()
            .broadcast_as((8, 3))
            .unwrap()
            .contiguous()
            .unwrap();
        let p = permute_qk(&w, 2).unwrap();
        let rows: Vec<f32> = p
            .narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // HF pairs (i, i + d/2) become adjacent rows in llama.cpp's layout.
        assert_eq!(rows, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        let back = unpermute_qk(&p, 2).unwrap();
        let diff = (back - &w)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn gguf_names() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight").unwrap(),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert!(hf_name("blk.0.something.weight").is_none());
    }
}
