"""The offline demo sources: seeded generators that stand in for downloads this machine cannot make."""
