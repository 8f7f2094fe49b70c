//! Choosing where the base lives: `--device auto|cpu|cuda[:N]` and `--dtype auto|bf16|f16|f32`.
//!
//! `auto` is the GPU when this build has the `cuda` feature and one is visible, else the CPU.
//! The dtype's `auto` is bf16 on a GPU and f32 on the CPU (where the kernels are f32).

use crate::model::Placement;
use anyhow::{bail, Result};
use candle_core::{DType, Device};
use std::fmt;
use std::str::FromStr;

/// A device as the user names it.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    /// The GPU when built with `cuda` and one is visible, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// A CUDA device by ordinal (`cuda` = `cuda:0`).
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => bail!("unknown device `{s}`: use auto, cpu, cuda or cuda:N"),
            },
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> String {
        d.to_string()
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device. `cuda` in a build without the feature, or without a usable GPU, is an
    /// error that says so; `auto` falls back to the CPU.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => Ok(open_cuda(0).unwrap_or(Device::Cpu)),
            Self::Cuda(n) => open_cuda(n),
        }
    }
}

/// Whether a CUDA device keeps cudarc's per-allocation events (`LORAPLEX_CUDA_EVENTS=1`; off by
/// default). cudarc creates two CUDA events with every allocation (every candle op's output) and
/// destroys them with it, but only records or waits on them when a context runs several streams;
/// loraplex runs every op on candle's one stream, so the events are host work per op and nothing
/// else. The variable keeps them, to measure what they cost (`scripts/gpu-check.sh`).
pub fn cuda_event_tracking() -> bool {
    std::env::var("LORAPLEX_CUDA_EVENTS").is_ok_and(|v| v == "1")
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    use anyhow::Context;
    let device =
        Device::new_cuda(ordinal).with_context(|| format!("cannot open CUDA device {ordinal}"))?;
    if let Device::Cuda(d) = &device {
        if !cuda_event_tracking() {
            // SAFETY: no tensor exists on this device yet, and all of loraplex's work on it
            // goes to the device's one stream (candle's), so no use on another stream needs
            // the events: cudarc records or waits on them only in multi-stream mode.
            unsafe { d.disable_event_tracking() };
        }
    }
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    bail!(
        "device cuda:{ordinal}: this loraplex was built without GPU support; rebuild with \
         `cargo build --release --features cuda` (see the README's GPU section)"
    )
}

/// Opens the device `--device` names and picks the dtype. `quantize` does not change where the
/// base goes: NF4 weights stay packed in host memory on the CPU and in the GPU's memory on a GPU.
pub fn placement(device: DeviceSpec, dtype: DtypeSpec) -> Result<Placement> {
    let device = device.open()?;
    let dtype = dtype.resolve(&device)?;
    Ok(Placement { device, dtype })
}

/// Free and total bytes of the device's memory (`None` on the CPU).
pub fn memory_info(device: &Device) -> Result<Option<(usize, usize)>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            use candle_core::cuda_backend::cudarc::driver::result;
            d.cuda_stream().context().bind_to_thread()?;
            Ok(Some(result::mem_get_info()?))
        }
        _ => Ok(None),
    }
}

/// Host memory a process may still take: `MemAvailable` from `/proc/meminfo`, or less when a
/// cgroup v2 limit (`/sys/fs/cgroup/memory.max` minus `memory.current`) leaves less. `None` where
/// neither can be read (not Linux).
pub fn host_memory_available() -> Option<usize> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let meminfo = read("/proc/meminfo").and_then(|t| mem_available(&t));
    let cgroup = match (
        read("/sys/fs/cgroup/memory.max"),
        read("/sys/fs/cgroup/memory.current"),
    ) {
        (Some(max), Some(current)) => cgroup_headroom(&max, &current),
        _ => None,
    };
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<usize> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// What a cgroup v2 limit leaves (`max` minus `current`); `None` when unlimited (`max`).
fn cgroup_headroom(max: &str, current: &str) -> Option<usize> {
    let max: usize = max.trim().parse().ok()?;
    let current: usize = current.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// A short name for a device, as the first stdout line and `info` show it.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".to_string(),
        },
        other => format!("{other:?}"),
    }
}

/// The dtype of the base's dense weights, activations and KV cache.
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
pub enum DtypeSpec {
    /// bf16 on a GPU, f32 on the CPU.
    #[default]
    Auto,
    Bf16,
    F16,
    F32,
}

impl DtypeSpec {
    /// The dtype on `device`. The CPU runs f32 only (its kernels and goldens are f32).
    pub fn resolve(self, device: &Device) -> Result<DType> {
        let dtype = match self {
            Self::Auto if device.is_cpu() => DType::F32,
            Self::Auto | Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
            Self::F32 => DType::F32,
        };
        if device.is_cpu() && dtype != DType::F32 {
            bail!("--dtype {dtype:?} needs a GPU: the CPU backend runs f32");
        }
        Ok(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse_and_print() {
        for (text, spec) in [
            ("auto", DeviceSpec::Auto),
            ("CPU", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(0)),
            ("cuda:3", DeviceSpec::Cuda(3)),
        ] {
            let parsed: DeviceSpec = text.parse().unwrap();
            assert_eq!(parsed, spec);
            assert_eq!(parsed.to_string().parse::<DeviceSpec>().unwrap(), spec);
        }
        for bad in ["tpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let err = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(err.contains("unknown device"), "{bad}: {err}");
        }
    }

    #[test]
    fn auto_is_f32_on_the_cpu_and_other_dtypes_are_refused_there() {
        assert_eq!(DtypeSpec::Auto.resolve(&Device::Cpu).unwrap(), DType::F32);
        assert_eq!(DtypeSpec::F32.resolve(&Device::Cpu).unwrap(), DType::F32);
        let err = DtypeSpec::Bf16
            .resolve(&Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a GPU"), "{err}");
    }

    #[test]
    fn host_memory_comes_from_meminfo_and_the_cgroup_limit() {
        let meminfo =
            "MemTotal:       32000000 kB\nMemFree: 1000 kB\nMemAvailable:   24212588 kB\n";
        assert_eq!(mem_available(meminfo), Some(24212588 * 1024));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(
            cgroup_headroom("4294967296\n", "1073741824\n"),
            Some(3 << 30)
        );
        assert_eq!(cgroup_headroom("max\n", "1073741824\n"), None);
        assert_eq!(cgroup_headroom("100", "200"), Some(0));
        // On Linux at least /proc/meminfo is there.
        #[cfg(target_os = "linux")]
        assert!(host_memory_available().is_some_and(|b| b > 0));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
        assert!(DeviceSpec::Auto.open().unwrap().is_cpu());
    }
}
