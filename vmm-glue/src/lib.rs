//! ferry-vmm-glue: guests that Ferry migrates (not built yet).
