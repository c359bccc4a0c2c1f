"""Model zoo: a shared ViT forward (vit.py), the shared map/score math (heads.py) and one file per model kind."""
