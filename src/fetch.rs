//! TEMPORARY stub; replaced by the real module.
pub fn ensure_default_model() -> anyhow::Result<std::path::PathBuf> {
    anyhow::bail!("stub")
}
pub fn fetch_default_model(_f: bool) -> anyhow::Result<std::path::PathBuf> {
    anyhow::bail!("stub")
}
