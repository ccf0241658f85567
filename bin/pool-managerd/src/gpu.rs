//! GPU discovery through NVML, loaded at run time: a node without the NVIDIA driver is a
//! CPU-only node and says so.

use llorch_contracts::GpuInfo;

#[derive(Debug, Clone)]
pub struct Discovery {
    /// `nvml` or `cpu-only`.
    pub mode: &'static str,
    pub gpus: Vec<GpuInfo>,
    /// Why NVML was not used, when it was not.
    pub reason: Option<String>,
}

pub fn discover() -> Discovery {
    match nvml() {
        Ok(gpus) if !gpus.is_empty() => Discovery {
            mode: "nvml",
            gpus,
            reason: None,
        },
        Ok(_) => Discovery {
            mode: "cpu-only",
            gpus: Vec::new(),
            reason: Some("NVML reports no GPU".into()),
        },
        Err(e) => Discovery {
            mode: "cpu-only",
            gpus: Vec::new(),
            reason: Some(e),
        },
    }
}

fn nvml() -> Result<Vec<GpuInfo>, String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| format!("NVML unavailable: {e}"))?;
    let count = nvml.device_count().map_err(|e| e.to_string())?;
    let mut gpus = Vec::with_capacity(count as usize);
    for index in 0..count {
        let dev = nvml.device_by_index(index).map_err(|e| e.to_string())?;
        let mem = dev.memory_info().map_err(|e| e.to_string())?;
        gpus.push(GpuInfo {
            index,
            name: dev.name().unwrap_or_else(|_| "unknown".into()),
            uuid: dev.uuid().ok(),
            memory_total_bytes: mem.total,
            memory_free_bytes: mem.free,
        });
    }
    Ok(gpus)
}

/// VRAM of the GPUs named by a device mask (indices or UUIDs), summed.
pub fn vram_for_mask(gpus: &[GpuInfo], mask: Option<&str>) -> Option<(u64, u64)> {
    let mask = mask?;
    let mut total = 0u64;
    let mut free = 0u64;
    let mut any = false;
    for part in mask.split(',') {
        let part = part.trim();
        let found = gpus
            .iter()
            .find(|g| g.index.to_string() == part || g.uuid.as_deref() == Some(part));
        if let Some(g) = found {
            total += g.memory_total_bytes;
            free += g.memory_free_bytes;
            any = true;
        }
    }
    any.then_some((total, free))
}

#[cfg(test)]
mod tests {
    use super::*;

    // covers: POOL-3116
    #[test]
    fn vram_sums_masked_gpus_by_index_or_uuid() {
        let g = |i: u32, t: u64| GpuInfo {
            index: i,
            name: "g".into(),
            uuid: Some(format!("GPU-{i}")),
            memory_total_bytes: t,
            memory_free_bytes: t / 2,
        };
        let gpus = vec![g(0, 100), g(1, 200)];
        assert_eq!(vram_for_mask(&gpus, Some("0,GPU-1")), Some((300, 150)));
        assert_eq!(vram_for_mask(&gpus, Some("7")), None);
        assert_eq!(vram_for_mask(&gpus, None), None);
    }
}
