"""Fine-tuning LLaMA-Adapter: Alpaca instruction data (train.data), the training loop, several GPUs."""
