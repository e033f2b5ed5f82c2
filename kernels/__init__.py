"""fastclip's Triton layer. Each module imports only torch and triton; import it directly."""
