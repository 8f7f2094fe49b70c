//! Reuse of the last upload of the same host data: a decode step's paged-KV metadata (the rows'
//! slots, block tables and lengths) is the same for every layer, so it is copied to the device
//! once per step instead of once per layer and op (`runtime::cuda::paged_kv`).
//!
//! A [`LastUpload`] keeps the last data and what uploading it gave (a device buffer); a request
//! for the same data returns that again, anything else replaces it. Buffers handed out are only
//! read by the kernels, and a replaced one is freed in stream order after the work queued on it.

use std::sync::Mutex;

/// The last upload of one kind: the device it went to (`K`), its data and the result.
pub struct LastUpload<K, B> {
    last: Mutex<Option<(K, Vec<u32>, B)>>,
}

impl<K: PartialEq, B: Clone> LastUpload<K, B> {
    pub const fn new() -> Self {
        Self {
            last: Mutex::new(None),
        }
    }

    /// What `upload(data)` gave last time, when `key` (the device, say) and `data` are those of
    /// the last call; otherwise `upload(data)`, kept for the next call.
    pub fn get<E>(
        &self,
        key: K,
        data: &[u32],
        upload: impl FnOnce(&[u32]) -> Result<B, E>,
    ) -> Result<B, E> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, held, buf)) = last.as_ref() {
            if *k == key && held[..] == *data {
                return Ok(buf.clone());
            }
        }
        let buf = upload(data)?;
        *last = Some((key, data.to_vec(), buf.clone()));
        Ok(buf)
    }
}

impl<K: PartialEq, B: Clone> Default for LastUpload<K, B> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_data_on_the_same_device_is_uploaded_once() {
        let cache: LastUpload<u32, usize> = LastUpload::new();
        let mut uploads = 0;
        let mut up = |d: &[u32]| -> Result<usize, ()> {
            uploads += 1;
            Ok(d.len() * 100 + uploads)
        };
        // 32 layers of one step: one upload.
        for _ in 0..32 {
            assert_eq!(cache.get(0, &[1, 2, 3], &mut up), Ok(301));
        }
        // New data (the next step), or another device: uploaded again.
        assert_eq!(cache.get(0, &[1, 2, 4], &mut up), Ok(302));
        assert_eq!(cache.get(1, &[1, 2, 4], &mut up), Ok(303));
        assert_eq!(cache.get(1, &[1, 2, 4], &mut up), Ok(303));
        // A prefix of the last data is other data.
        assert_eq!(cache.get(1, &[1, 2], &mut up), Ok(204));
        // A failed upload keeps nothing new.
        assert_eq!(cache.get(1, &[9], |_| Err::<usize, ()>(())), Err(()));
        assert_eq!(cache.get(1, &[1, 2], &mut up), Ok(204));
        assert_eq!(uploads, 4);
    }
}
