# syntax=docker/dockerfile:1
# A release (offline.export's output folder) as an image, so pods receive it the way they receive
# code: by immutable tag, from the registry the cluster already pulls from. The pods' init
# containers copy /release into a volume (deploy/base). The build context is the release folder:
#   docker build -f deploy/docker/release.Dockerfile -t ranker-release:RELEASE_ID releases/RELEASE_ID
FROM busybox:1.37.0
COPY . /release
USER 65534:65534
