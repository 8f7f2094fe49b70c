//! Default-model fetch (placeholder, being written).
