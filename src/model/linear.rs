//! A frozen linear layer of the base model, `y = x W^T (+ b)`, with `W` either a dense tensor or
//! NF4-packed (QLoRA's 4-bit NormalFloat, `quant`) in host memory (the CPU backend) or in a GPU's
//! memory, and the quantization settings.

use crate::quant::{quantize_nf4, Nf4Device, Nf4Linear, Nf4Packed, DEFAULT_BLOCKSIZE};
use anyhow::Context;
use candle_core::{DType, Device, Result, Tensor};
use std::sync::Arc;

/// `--quantize` / `quantize = ...`: how to store the base's linear weights once loaded.
#[derive(
    Copy,
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Quantize {
    /// As the file stores them (f32 in memory; a bitsandbytes NF4 checkpoint stays NF4).
    #[default]
    None,
    /// QLoRA's 4-bit NormalFloat, bitsandbytes' algorithm and layout.
    Nf4,
}

impl Quantize {
    /// The NF4 settings this choice asks for; `double_quant` without NF4 is an error.
    pub fn settings(self, double_quant: bool) -> anyhow::Result<Option<Nf4Settings>> {
        match self {
            Quantize::None if double_quant => {
                anyhow::bail!("double quantization needs `--quantize nf4` (quantize = \"nf4\")")
            }
            Quantize::None => Ok(None),
            Quantize::Nf4 => Ok(Some(Nf4Settings::new(double_quant))),
        }
    }
}

/// How the base's linear weights (q/k/v/o/gate/up/down) are quantized.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Nf4Settings {
    /// Elements per absmax block (bitsandbytes' default is 64).
    pub blocksize: usize,
    /// QLoRA's double quantization: the absmax values themselves stored as 8-bit.
    pub double_quant: bool,
}

impl Nf4Settings {
    pub fn new(double_quant: bool) -> Self {
        Self {
            blocksize: DEFAULT_BLOCKSIZE,
            double_quant,
        }
    }

    /// Quantizes a dense `[out, in]` weight.
    pub fn quantize(&self, weight: &Tensor) -> anyhow::Result<Nf4Packed> {
        let (rows, cols) = weight.dims2()?;
        let data = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut packed = quantize_nf4(&data, rows, cols, self.blocksize)?;
        if self.double_quant {
            packed.double_quantize();
        }
        Ok(packed)
    }
}

/// A projection's weight matrix `[out, in]`.
#[derive(Clone, Debug)]
pub enum LinearWeight {
    /// A dense tensor in the model's dtype (f32 on the CPU; bf16, f16 or f32 on a GPU).
    Dense(Tensor),
    /// Packed in host memory, for the CPU backend.
    Nf4(Arc<Nf4Packed>),
    /// Packed in a device's memory (a GPU), with its host copy.
    Nf4Device(Arc<Nf4Device>),
}

impl LinearWeight {
    /// A packed weight where `device` computes with it: in host memory for the CPU, uploaded
    /// otherwise.
    pub fn nf4_on(packed: Arc<Nf4Packed>, device: &Device) -> Result<Self> {
        match device.is_cpu() {
            true => Ok(LinearWeight::Nf4(packed)),
            false => Self::nf4_device(packed, device),
        }
    }

    /// A packed weight uploaded to `device`'s memory.
    fn nf4_device(packed: Arc<Nf4Packed>, device: &Device) -> Result<Self> {
        Ok(LinearWeight::Nf4Device(Arc::new(Nf4Device::upload(
            packed, device,
        )?)))
    }
}

/// A frozen linear layer `y = x W^T (+ b)`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: LinearWeight,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// `x: [.., in]` → `[.., out]` (candle ops; the NF4 op has an input-gradient backward).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Dense(w) => x.matmul(&w.t()?)?,
            LinearWeight::Nf4(w) => {
                return Nf4Linear::from_arc(w.clone(), self.bias.clone()).forward(x)
            }
            LinearWeight::Nf4Device(w) => w.matmul(x)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }

    /// `(out, in)`.
    pub fn shape(&self) -> (usize, usize) {
        match &self.weight {
            LinearWeight::Dense(w) => {
                let d = w.dims();
                (d[0], d.get(1).copied().unwrap_or(0))
            }
            LinearWeight::Nf4(w) => (w.rows, w.cols),
            LinearWeight::Nf4Device(w) => w.shape(),
        }
    }

    /// The NF4 weight (its host copy), when this layer is quantized.
    pub fn nf4(&self) -> Option<&Arc<Nf4Packed>> {
        match &self.weight {
            LinearWeight::Nf4(w) => Some(w),
            LinearWeight::Nf4Device(w) => Some(w.host()),
            LinearWeight::Dense(_) => None,
        }
    }

    /// Moves a weight packed in host memory to `device`'s memory (kept as it is on the CPU
    /// unless `force`: tests run the device ops on the CPU).
    pub fn place_nf4(&mut self, device: &Device, force: bool) -> Result<()> {
        if let LinearWeight::Nf4(w) = &self.weight {
            if force || !device.is_cpu() {
                self.weight = LinearWeight::nf4_device(w.clone(), device)?;
            }
        }
        Ok(())
    }

    /// The weight as a dense f32 tensor (dequantized when packed).
    pub fn dense_weight(&self, device: &Device) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Ok(w.clone()),
            LinearWeight::Nf4(w) => Tensor::from_vec(w.dequantize(), (w.rows, w.cols), device),
            LinearWeight::Nf4Device(w) => w.dequantize(DType::F32),
        }
    }

    /// Replaces a dense weight by its NF4 quantization (a quantized one is left as it is), kept
    /// on the weight's device.
    pub fn quantize(&mut self, settings: Nf4Settings) -> anyhow::Result<()> {
        if let LinearWeight::Dense(w) = &self.weight {
            let device = w.device().clone();
            self.weight = LinearWeight::nf4_on(Arc::new(settings.quantize(w)?), &device)?;
        }
        Ok(())
    }

    /// Adds `delta` (`[out, in]`) to the weight. A packed weight is dequantized, summed and
    /// quantized again with its own settings, which rounds the merged weight to the NF4 grid:
    /// the return value says whether that happened (the caller warns about the loss).
    pub fn add_delta(&mut self, delta: &Tensor) -> anyhow::Result<bool> {
        match &self.weight {
            LinearWeight::Dense(w) => {
                self.weight = LinearWeight::Dense((w + delta)?);
                Ok(false)
            }
            LinearWeight::Nf4(w) => {
                let packed = Self::merged_nf4(w, delta)?;
                self.weight = LinearWeight::Nf4(Arc::new(packed));
                Ok(true)
            }
            LinearWeight::Nf4Device(w) => {
                let packed = Arc::new(Self::merged_nf4(w.host(), delta)?);
                self.weight = LinearWeight::nf4_device(packed, w.device())?;
                Ok(true)
            }
        }
    }

    /// `w + delta` quantized again with `w`'s own settings (on the host).
    fn merged_nf4(w: &Nf4Packed, delta: &Tensor) -> anyhow::Result<Nf4Packed> {
        let dense = Tensor::from_vec(w.dequantize(), (w.rows, w.cols), &Device::Cpu)?;
        let merged = (dense + delta.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)?;
        let settings = Nf4Settings {
            blocksize: w.blocksize,
            double_quant: w.is_double_quant(),
        };
        let mut packed = settings
            .quantize(&merged)
            .context("re-quantizing the merged weight")?;
        packed.dtype = w.dtype.clone();
        Ok(packed)
    }

    /// Resident bytes of the weight and bias, by dtype name (`"nf4"` for packed weights, their
    /// block scales included).
    pub fn bytes_by_dtype(&self) -> Vec<(String, usize)> {
        let mut out = Vec::with_capacity(2);
        match &self.weight {
            LinearWeight::Dense(w) => out.push(tensor_bytes(w)),
            LinearWeight::Nf4(w) => out.push(("nf4".to_string(), w.resident_bytes())),
            LinearWeight::Nf4Device(w) => out.push(("nf4".to_string(), w.resident_bytes())),
        }
        if let Some(b) = &self.bias {
            out.push(tensor_bytes(b));
        }
        out
    }
}

/// A tensor's dtype name and bytes.
pub fn tensor_bytes(t: &Tensor) -> (String, usize) {
    (
        format!("{:?}", t.dtype()).to_lowercase(),
        t.elem_count() * t.dtype().size_in_bytes(),
    )
}
