"""seer.data: webdataset shards (`seer.data.shards`: write_shards, train_loader, eval_loader, expand_urls) and
image transforms (`seer.data.transforms`). Submodules are imported on use, so `import seer.data` stays cheap."""
