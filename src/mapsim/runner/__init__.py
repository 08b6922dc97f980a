"""Running a spec: orders the stages, blocks of images, resume, torchrun and publishing the results."""
