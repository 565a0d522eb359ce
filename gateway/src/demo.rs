//! `spillway demo` (placeholder replaced below).
pub struct DemoOptions {
    pub duration: std::time::Duration,
    pub replicas: usize,
}
pub async fn run(_o: DemoOptions) -> Result<(), Box<dyn std::error::Error>> {
    Ok(())
}
